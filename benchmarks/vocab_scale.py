"""Time and peak memory at LLaDA's vocabulary (V = 126,464), L = 1024, B = 1, on a tiny backbone (the
DiT 'test' preset: hidden 32, 2 blocks), for the code BEFORE and AFTER a change, interleaved:

    python benchmarks/vocab_scale.py [--before-rev fcf38a0 | --before DIR] [--after DIR]
                                     [--vocab 126464] [--length 1024] [--rounds 3] [--device cpu|cuda]

Cases (each one fresh child process of the checkout measured, with that checkout on sys.path):
  step, all masked        ``samplers.mdlm`` with one step (no final noise removal) on an all-masked
                          sequence: one forward pass (SUBS log-probs) and one draw; also the draw
                          alone on those log-probs
  step, half given        the same with the first L/2 positions fixed (given): L/2 positions may change
  step, top-p 0.9         the all-masked step with nucleus p = 0.9
  PRISM train, n_y = 1|4  one ``losses.prism`` step (k = 4, λ = 5, backbone + linear head training):
                          forward (2 backbone passes) + backward

Memory (CPU), in its own child: the peak resident set size during the measured call minus the
resident set size just before it (the kernel's high-water mark VmHWM, reset through
/proc/self/clear_refs before the call), after a warm-up on 16 positions; the child runs with
MALLOC_MMAP_THRESHOLD_=1048576 so that every allocation of 1 MiB or more is mapped on its own and
given back when freed: the RSS then follows the live tensors. It counts everything the call touches
(the backbone's activations too), so it bounds the tensors alive at once from above. On CUDA: peak
``torch.cuda.max_memory_allocated`` minus the allocation before the call. Time, in another child
with the default allocator: one full-size warm-up call, then the wall clock (CUDA synchronised) of
the next ``--repeats`` calls, their median; over ``--rounds`` interleaved rounds, the median of the
medians. Memory: the largest over the rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["step_all", "step_half", "step_top_p", "train_ny1", "train_ny4"]
LABELS = {"step_all": "sampler step, all masked", "step_half": "sampler step, half given",
          "step_top_p": "sampler step, top-p 0.9", "train_ny1": "PRISM train step, n_y = 1",
          "train_ny4": "PRISM train step, n_y = 4"}


# ---- child: one case in one process -------------------------------------------------------------

def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(fn, device):
    """(seconds, peak extra bytes) of fn()."""
    import time

    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")) - base
    del result
    return seconds, peak


def child(case, V, L, device, threads, mode, repeats):
    import inspect

    import torch

    torch.set_num_threads(threads)
    from prism.backbones.dit import DiT
    from prism.heads.quality import LinearHead
    from prism.losses.prism import PRISMLoss
    from prism.model import MDM
    from prism.samplers import mdlm_sampler
    import prism.samplers.draw as draws

    torch.manual_seed(0)
    mask = V - 1
    model = MDM(DiT(vocab_size=V, mask_id=mask, preset="test"), LinearHead).to(device)
    with torch.no_grad():  # the zero-initialised output layer would give uniform posteriors
        model.backbone.output_layer.linear.weight.normal_(0, 1.0)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    # the draw the samplers use: categorical_draw after this change, gumbel_max before it
    draw = getattr(draws, "categorical_draw", None) or draws.gumbel_max
    lean_draw = "positions" in inspect.signature(draw).parameters
    res = {}

    def record(key, fn, warm):
        """res[key + seconds | peak]: memory of one call after ``warm``, or the median time of
        ``repeats`` calls after one full-size warm-up call."""
        import statistics

        if mode == "memory":
            warm()
            res[key + "seconds"], res[key + "peak"] = measure(fn, device)
        else:
            fn()
            res[key + "seconds"] = statistics.median(measure(fn, device)[0] for _ in range(repeats))

    def batch_of(n):
        ids = torch.randint(0, V - 1, (1, n), generator=torch.Generator().manual_seed(2))
        fixed = torch.zeros(1, n, dtype=torch.bool)
        if case == "step_half":
            fixed[:, : n // 2] = True
        return {k: v.to(device) for k, v in {"input_ids": torch.where(fixed, ids, mask), "fixed": fixed}.items()}

    if case.startswith("step"):
        model.eval()
        sampler = mdlm_sampler(steps=1, noise_removal=False, top_p=0.9 if case == "step_top_p" else 1.0)
        b = batch_of(L)
        record("", lambda: sampler(model, b, gen()).tokens, lambda: sampler(model, batch_of(16), gen()))
        with torch.no_grad():
            lp = model(b["input_ids"]).log_probs
        masked = b["input_ids"] == mask
        kw = dict(positions=masked, fill=b["input_ids"]) if lean_draw else {}
        p = sampler.draw.top_p
        record("draw_", lambda: draw(lp, gen(), 1.0, p, **kw),
               lambda: draw(lp[:, :16], gen(), 1.0, p, **({k: v[:, :16] for k, v in kw.items()})))
        res["drawn_rows"] = int(masked.sum()) if lean_draw else L
    else:
        n_y = int(case[-1])
        loss = PRISMLoss(k=4, n_y=n_y, mdm_weight=5.0)
        loss.attach(model)
        model.train()

        def step(n):
            x = torch.randint(0, V - 1, (1, n), generator=torch.Generator().manual_seed(3)).to(device)
            out = loss(model, {"input_ids": x, "fixed": torch.zeros_like(x, dtype=torch.bool)}, gen())
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return float(out.loss)

        record("", lambda: step(L), lambda: step(16))
    print("RESULT " + json.dumps(res))


# ---- parent: interleave the checkouts, print the table -----------------------------------------

def run_child(root, case, args, mode):
    env = dict(os.environ, PYTHONPATH=root)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "vocab_scale.py"), "--child", case, "--vocab", str(args.vocab),
           "--length", str(args.length), "--device", args.device, "--threads", str(args.threads), "--mode", mode,
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{root} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None, help="a checkout of the code before (default: --before-rev, archived)")
    p.add_argument("--before-rev", default="fcf38a0", help="the commit before the lean sampler and loss")
    p.add_argument("--after", default=REPO)
    p.add_argument("--vocab", type=int, default=126_464)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=2, help="timed calls per child, after a warm-up call")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="time", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.vocab, args.length, args.device, args.threads, args.mode, args.repeats)
    before = args.before
    if before is None:
        before = tempfile.mkdtemp(prefix="prism_before_")
        subprocess.run(f"git -C {REPO} archive {args.before_rev} | tar -x -C {before}", shell=True, check=True)
    cases = args.cases.split(",")
    runs = {(v, c): [] for v in ("before", "after") for c in cases}
    for r in range(args.rounds):
        for c in cases:
            for v, root in (("before", before), ("after", args.after)):
                timed, memory = run_child(root, c, args, "time"), run_child(root, c, args, "memory")
                runs[v, c].append({**timed, **{k: x for k, x in memory.items() if k.endswith("peak")}})
                print(f"round {r + 1} {v:6s} {c}: {runs[v, c][-1]}", flush=True)
    unit = args.length * args.vocab * 4  # one (L, V) float32 tensor
    mb = lambda b: f"{b / 1e6:,.0f} MB ({b / unit:.2f} ×)"  # noqa: E731
    lines = [f"V = {args.vocab:,}, L = {args.length}, B = 1, DiT 'test' preset, {args.device}, {args.threads} threads; "
             f"one (L, V) float32 tensor = {unit / 1e6:,.0f} MB; time: median of {args.rounds} rounds × {args.repeats} calls; memory: largest", "",
             "| measured | before: seconds | before: peak memory | after: seconds | after: peak memory | speed-up |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        for what, t_key, m_key in ((LABELS[c], "seconds", "peak"), (f"draw alone ({LABELS[c][14:]})", "draw_seconds", "draw_peak")):
            if t_key not in runs["after", c][0]:
                continue
            tb = statistics.median(x[t_key] for x in runs["before", c])
            ta = statistics.median(x[t_key] for x in runs["after", c])
            mb_b = max(x[m_key] for x in runs["before", c])
            mb_a = max(x[m_key] for x in runs["after", c])
            lines.append(f"| {what} | {tb:.2f} | {mb(mb_b)} | {ta:.2f} | {mb(mb_a)} | {tb / ta:.1f} × |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
