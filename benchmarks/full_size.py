"""The headline compositions at their real size on one CPU machine: LLaDA-8B + LoRA r = 256 + the PRISM
head trained with the PRISM loss and sampled with the semi-AR PRISM sampler on MBPP (scored by the
sandboxed executor), and MDLM-OWT (169.6M) fine-tuned with the PRISM loss at L = 1024 and sampled
for one cell of the OWT sweep — all on random weights written once in the released layouts.

    python benchmarks/full_size.py llada8b      [--cache DIR] [--phases ...] [--redo PHASE ...]
    python benchmarks/full_size.py mdlm_owt     [...]
    python benchmarks/full_size.py llada_small  # the same phases on a tiny model (seconds; the CI test)

Phases (``benchmarks/full_size_phases.py``), each in a child process of its own, in order; a phase
whose result is recorded is skipped (resumable; ``--redo`` runs it again):
  LLaDA  weights   config.json + bf16 safetensors shards + index in the released layout, written
                   tensor by tensor (never the whole model, not even a shard, in memory)
         load      the backbone from those shards (peak vs the bf16 model's bytes + the runtime)
         train     run.py train gin/sft/llada_lora_prism.gin (LoRA r = 256 on q/k/v + heads.mlp, PRISM
                   loss, gradient checkpointing, bf16) for 2 steps, an adapter + head checkpoint per step
         resume    a new run that starts from the train run's step-1 checkpoint: its step-2 loss is
                   compared with the uninterrupted run's
         mdm_step  the same run with the MDM loss alone (losses.mdlm, LLaDA's SFT normalisation)
         sample    the trained adapter onto the base; samplers.semi_ar as gin/mbpp/llada_lora_prism_semiar.gin
                   on the first MBPP test prompts, several variants (with / without PRISM remasking,
                   no cache / dual cache + threshold) at one shortened setting; each scored by the
                   sandboxed executor (pass@1 on random weights is 0: that it runs and scores is the point)
         sample_full the fast variant (dual cache + threshold + PRISM remasking) at the recipe's full
                   setting: 512 generated tokens (1024 in all), blocks of 64, 256 steps, one prompt
  MDLM   weights   the HF layout of kuleshov-group/mdlm-owt (config.json + model.safetensors, float32)
         convert   python -m prism.mdlm_weights convert (the user path into PRISM's layout)
         train     run.py train gin/owt/prism_mdlm_owt.gin for 2 steps at L = 1024
         sweep     benchmarks/owt_sweep.py, MDLM and PRISM samplers at N = 128, nucleus 0.9, offline judges
Measured per phase (``<phase>.<figure>`` in the JSON): wall seconds, peak resident memory (the child's
high-water mark), tokens/s where tokens are processed (generated tokens only when sampling), bytes on
disk of what it wrote; beside them what ``benchmarks/llada_memory.py``'s formula predicts
(``*.predicted_peak_bytes``). Offline stand-ins, stated in the table: the 'gpt2-chat' tokenizer (GPT-2 +
LLaDA's special tokens; its mask id bound as the model's), MBPP's train split as SFT data, the offline
Wikipedia text for OpenWebText, SmolLM2-135M / MiniLM as the text judges.

Writes ``benchmarks/results/full_size_<profile>.json`` and ``.md``; weights and runs go under
``--cache`` (default ``$PRISM_CACHE/full_size`` or ``~/.cache/prism/full_size``), never the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_phases import PHASES, PROFILES  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")


def default_cache() -> str:
    root = os.environ.get("PRISM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prism")
    return os.path.join(root, "full_size")


def run_phase(profile_name, phase, work):
    import full_size_llada as L
    import full_size_mdlm as M

    """Run one phase of a profile in this process (the child): the LLaDA or MDLM part's function."""
    profile = PROFILES[profile_name]
    os.makedirs(work, exist_ok=True)
    if profile["family"] == "llada":
        table = dict(weights=lambda: L.write_llada(profile, os.path.join(work, "weights")),
                     load=lambda: L.phase_load(profile, work), train=lambda: L.phase_train(profile, work),
                     resume=lambda: L.phase_resume(profile, work),
                     mdm_step=lambda: L.phase_train(profile, work, loss="@losses.mdlm()"),
                     sample=lambda: L.phase_sample(profile, work),
                     sample_full=lambda: L.phase_sample(profile, work, "sample_full"))
    else:
        table = dict(weights=lambda: M.write_mdlm(profile, os.path.join(work, "weights")),
                     convert=lambda: M.phase_convert(profile, work), train=lambda: M.phase_owt_train(profile, work),
                     sweep=lambda: M.phase_sweep(profile, work))
    return table[phase]()


def run_child(profile: str, phase: str, work: str, log) -> dict:
    """One phase in a child process; its stdout streamed here; (result, wall s, peak RSS bytes)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, profile, "--cache", os.path.dirname(work)]
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            continue
        sys.stdout.write(f"  [{phase}] {line}")
        sys.stdout.flush()
        log.write(line)
        log.flush()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"phase {phase} failed (exit {proc.returncode}); its output is in {log.name}")
    # the child's own figure when it measured one phase-specific peak (e.g. loading alone), else the process's
    result.setdefault("peak_rss_bytes", usage.ru_maxrss * 1024)
    result.update(wall_s=round(wall, 1), process_peak_rss_bytes=usage.ru_maxrss * 1024)
    return result


def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def flat(results: dict) -> dict:
    """{'<phase>.<figure>': value}: every figure named by its phase."""
    return {f"{ph}.{k}": v for ph, r in results.get("phases", {}).items() for k, v in r.items()}


def gb(x):
    return "–" if x is None else f"{x / 1e9:.2f}"


def markdown(profile: str, res: dict) -> str:
    from full_size_phases import describe

    lines = [f"# Full-size rehearsal: `{profile}`", "", describe(profile, res), "",
             "| phase | wall s | peak RSS GB (measured) | predicted peak GB | pred./meas. | tokens/s | on disk GB | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for ph, r in res.get("phases", {}).items():
        pred = r.get("predicted_peak_bytes")
        ratio = f"{pred / r['peak_rss_bytes']:.2f}" if pred else "–"
        tps = r.get("tokens_per_s")
        lines.append(f"| {ph} | {r['wall_s']:.0f} | {gb(r['peak_rss_bytes'])} | {gb(pred)} | {ratio} | "
                     f"{'–' if tps is None else f'{tps:.3g}'} | {gb(r.get('disk_bytes'))} | {r.get('notes', '')} |")
    extra = res.get("derived", {})
    if extra:
        lines += ["", "| derived | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in extra.items()]
    lines += ["", f"Machine: {res.get('machine', '')}", f"Commit {res.get('commit', '?')}, {res.get('date', '')}; "
              f"load: {res.get('load', 'see the README')}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", choices=sorted(PROFILES))
    p.add_argument("--cache", default=None, help="where weights and runs go (not the repository)")
    p.add_argument("--phases", nargs="+", default=None, help="only these phases (in the profile's order)")
    p.add_argument("--redo", nargs="+", default=[], help="run these phases again even if recorded")
    p.add_argument("--out", default=RESULTS, help="directory of full_size_<profile>.json / .md")
    p.add_argument("--load-note", default=None, help="what else ran on the machine (stated in the table)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cache = os.path.abspath(args.cache or default_cache())
    work = os.path.join(cache, args.profile)
    if args.child:

        out = run_phase(args.profile, args.child, work)
        print("RESULT " + json.dumps(out), flush=True)
        return out
    family = PROFILES[args.profile]["family"]
    order = PHASES[family]
    wanted = args.phases or order
    unknown = sorted(set(wanted + args.redo) - set(order))
    if unknown:
        p.error(f"unknown phases {unknown} for {args.profile}; its phases: {order}")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"full_size_{args.profile}.json")
    res = load_results(json_path)
    res.setdefault("phases", {})
    from prism import cli as run_cli
    from full_size_phases import derive, machine

    res.update(profile=args.profile, machine=machine(), commit=run_cli.git_commit().get("commit"),
               date=time.strftime("%Y-%m-%d"), versions=run_cli.package_versions())
    if args.load_note is not None:
        res["load"] = args.load_note
    with open(os.path.join(work, "log.txt"), "a") as log:
        for ph in [x for x in order if x in wanted]:
            if ph in res["phases"] and ph not in args.redo:
                print(f"{ph}: recorded, skipped (--redo {ph} to run it again)")
                continue
            print(f"{ph}: running (cache {work})", flush=True)
            res["phases"][ph] = run_child(args.profile, ph, work, log)
            res["derived"] = derive(args.profile, res["phases"])
            res["flat"] = flat(res)
            write_atomic(json_path, json.dumps(res, indent=2))
            write_atomic(json_path[:-5] + ".md", markdown(args.profile, res))
            r = res["phases"][ph]
            print(f"{ph}: {r['wall_s']:.0f} s, peak {r['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    res["derived"] = derive(args.profile, res["phases"])
    res["flat"] = flat(res)
    write_atomic(json_path, json.dumps(res, indent=2))
    write_atomic(json_path[:-5] + ".md", markdown(args.profile, res))
    print(markdown(args.profile, res))
    return res


if __name__ == "__main__":
    main()
