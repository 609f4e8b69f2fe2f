"""PRISM's Figure 4 / Table 2 (unconditional text) at CPU scale: MAUVE, generative perplexity and
unigram entropy of unconditional samples of 128 tokens against the number of network passes N, for
MDLM, ReMDM-cap / -conf / -loop and PRISM / PRISM-loop, all with nucleus top_p 0.9, plus a reference
row of held-out real text.

    python benchmarks/owt_sweep.py [--nfe 16 32 64 128 256] [--samplers mdlm prism ...] [--n 128]
        [--batch-size 32] [--seed 0] [--metrics entropy gen_ppl mauve] [--mdm weights/owt/mdm.safetensors]
        [--head weights/owt/prism_head.safetensors] [--out benchmarks/results/owt_sweep] [--resume]
        [--limit-minutes M] [--bind "gin binding" ...]

Samplers at total NFE N (rows of PRISM's Table 2):
  mdlm        samplers.mdlm, N steps (unchanged steps reuse the last pass: it may report fewer)
  remdm_cap   samplers.remdm 'cap', η = 0.02 (ReMDM's OWT setting), N steps
  remdm_conf  samplers.remdm 'conf', N steps
  remdm_loop  samplers.remdm 'loop' (t_on 0.55, t_off 0.05, α_on 0.9, η 0.02), N steps
  prism       samplers.prism_owt (η = 2.56/N, ℓ_on = ⌈N/2⌉, cap, nucleus 'within'), N steps, PRISM model
  prism_loop  samplers.prism_owt, N/2 steps + N/2 loop steps remasking --loop-remask uniformly random
              tokens (Algorithm 4), PRISM model
The MDLM / ReMDM rows run gin/owt/small_cpu.gin with --mdm; the PRISM rows gin/owt/prism_cpu.gin with
--mdm and the head-only file --head on top. Every configuration draws batch i with the generator
step_generator(seed, i, domain=1) (as `run.py eval`). Metrics (prism/metrics/text.py) on the texts
task.decode gives: entropy always; gen_ppl under --judge; mauve with --featurizer against n held-out
blocks of the task; the reference row scores n other held-out blocks. Judge and featurizer load once.

Writes OUT/owt_sweep.json (every number, argv, versions, seconds; rewritten atomically after each
configuration, so --resume skips finished ones), OUT/owt_sweep.md (table), OUT/owt_sweep.png (MAUVE,
Gen PPL, entropy vs NFE) and OUT/owt_samples.md (2 samples of each sampler at --samples-at).
"""
import argparse
import json
import math
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gin  # noqa: E402
import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.metrics.corpus import run_scorers  # noqa: E402
from prism.paths import write_text_atomic  # noqa: E402
from prism.metrics.text import Entropy, GenerativePerplexity, Mauve, reference_metrics  # noqa: E402
from prism.training.loop import step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402

MDM_GIN, PRISM_GIN = "gin/owt/small_cpu.gin", "gin/owt/prism_cpu.gin"
SAMPLERS = ["mdlm", "remdm_cap", "remdm_conf", "remdm_loop", "prism", "prism_loop"]
LABELS = {"mdlm": "MDLM", "remdm_cap": "ReMDM-cap", "remdm_conf": "ReMDM-conf", "remdm_loop": "ReMDM-loop",
          "prism": "PRISM", "prism_loop": "PRISM-loop"}
METRICS = ["entropy", "gen_ppl", "mauve"]
HINT = {"mdm": "make it with: python run.py train gin/owt/small_cpu.gin --output-dir runs/owt_mdm && "
               "python -m prism.export runs/owt_mdm weights/owt/mdm.safetensors --dtype bfloat16",
        "head": "make it with: python run.py train gin/owt/prism_cpu.gin --output-dir runs/owt_prism && "
                "python -m prism.export runs/owt_prism weights/owt/prism_head.safetensors --only 'head.*'"}
VERSIONED = cli.VERSIONED + ["mauve-text", "matplotlib"]


def config_for(sampler, n_steps, top_p, loop_remask, mdm_gin=MDM_GIN, prism_gin=PRISM_GIN):
    """(model gin, sampler gin or None, bindings) of a sampler at total NFE ``n_steps``."""
    p = f"{top_p!r}"
    if sampler == "mdlm":
        return mdm_gin, None, [f"STEPS = {n_steps}", f"samplers.mdlm.top_p = {p}"]
    if sampler.startswith("remdm_"):
        strategy = sampler.split("_")[1]
        sgin = {"cap": "samplers/remdm.gin", "conf": "samplers/remdm_conf.gin", "loop": "samplers/remdm_loop.gin"}[strategy]
        binds = [f"STEPS = {n_steps}", f"samplers.remdm.strategy = '{strategy}'", f"samplers.remdm.top_p = {p}"]
        if strategy in ("cap", "loop"):
            binds.append("samplers.remdm.eta = 0.02")
        if strategy == "loop":
            binds += ["samplers.remdm.t_on = 0.55", "samplers.remdm.t_off = 0.05", "samplers.remdm.alpha_on = 0.9"]
        return mdm_gin, sgin, binds
    binds = [f"samplers.prism_owt.top_p = {p}", "samplers.prism_owt.cap = True", "samplers.prism_owt.nucleus = 'within'"]
    if sampler == "prism":
        return prism_gin, "samplers/prism_owt.gin", [f"STEPS = {n_steps}"] + binds
    half = n_steps // 2
    return prism_gin, "samplers/prism_owt.gin", [f"STEPS = {half}", f"samplers.prism_owt.loop_steps = {half}",
                                                  f"samplers.prism_owt.loop_remask = {loop_remask}",
                                                  "samplers.prism_owt.loop_choice = 'uniform'"] + binds


def build(args, sampler, n_steps):
    """The experiment (model with its weights, task, sampler) of one configuration."""
    model_gin, sampler_gin, binds = config_for(sampler, n_steps, args.top_p, args.loop_remask, args.mdm_gin,
                                               args.prism_gin)
    common = [f"experiment.init_checkpoint = '{args.mdm}'", "experiment.loss = None", f"tasks.text.n_eval = {args.n}"]
    if model_gin == args.prism_gin:
        common += ["experiment.init_new = ['head']", f"experiment.init_adapter = '{args.head}'"]
    else:
        common += ["experiment.init_new = []", "experiment.init_adapter = None"]
    gin.clear_config()
    cli.parse_gin([model_gin] + ([sampler_gin] if sampler_gin else []), common + binds + list(args.bind))
    return build_experiment()


def make_scorers(args, task):
    """Entropy always, then the asked-for judge / featurizer (each loads its model once, on first use)."""
    scorers = [Entropy()]
    if "gen_ppl" in args.metrics:
        scorers.append(GenerativePerplexity(judge=args.judge))
    if "mauve" in args.metrics:  # n held-out blocks, distinct from the reference row's n blocks
        scorers.append(Mauve(references=task.reference_texts(2 * args.n, seed=args.seed)[args.n:],
                             featurizer=args.featurizer, n=args.n))
    return scorers


def wanted_keys(args):
    return [m for m in METRICS if m == "entropy" or m in args.metrics]


@torch.no_grad()
def sample(exp, args, device):
    """(records, NFE per batch, seconds) of ``--n`` unconditional samples."""
    model, task = exp.model.to(device).eval(), exp.task
    records, nfe, t0 = [], [], time.time()
    for i, batch in enumerate(task.eval_batches(args.batch_size)):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = exp.sampler(model, batch, step_generator(args.seed, i, domain=1))
        nfe.append(int(out.nfe))
        for tokens in out.tokens.cpu():
            records.append({"index": len(records), "tokens": tokens.tolist(), "text": task.decode(tokens)})
    return records, nfe, time.time() - t0


def fmt(value, digits):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def cell(m):
    return f"{fmt(m.get('mauve'), 3)} / {fmt(m.get('gen_ppl'), 1)} / {fmt(m.get('entropy'), 2)}"


def write_markdown(res, path):
    s, configs = res["settings"], res["configs"]
    nfes = sorted({c["nfe_target"] for c in configs.values()})
    names = [x for x in SAMPLERS if any(c["sampler"] == x for c in configs.values())]
    judge = s["judge"] if "gen_ppl" in s["metrics"] else "not computed"
    feat = s["featurizer"] if "mauve" in s["metrics"] else "not computed"
    lines = [f"Unconditional text, CPU scale: {s['n']} samples of {s['seq_len']} tokens per cell, nucleus top_p "
             f"{s['top_p']}, seed {s['seed']}. Cells: MAUVE (featurizer {feat}, against {s['n']} held-out blocks) / "
             f"Gen PPL (judge {judge}) / unigram entropy (nats); NFE: the mean network passes per batch each "
             f"sampler reported. Base MDM {s['mdm']}, PRISM head {s['head']}.", "",
             "| sampler | " + " | ".join(f"N = {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name in names:
        row = []
        for n in nfes:
            c = configs.get(f"{name}@{n}")
            row.append(f"{cell(c['metrics'])} (NFE {c['nfe']:g})" if c else "")
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + " |")
    if res.get("reference"):
        lines.append(f"| real text ({res['reference']['n']} held-out blocks) | "
                     + " | ".join(cell(res["reference"]) for _ in nfes) + " |")
    lines += ["", "Seconds (sampling + metrics) per configuration: " + ", ".join(
        f"{k} {c['seconds']:.0f}+{c['seconds_metrics']:.0f}" for k, c in configs.items()),
        "", "Command: python " + shlex.join(res["argv"])]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_samples(res, path, at, chars=400):
    lines = [f"# Unconditional samples at N = {at} (first 2 of each sampler, {chars} characters at most)", ""]
    for name in SAMPLERS:
        c = res["configs"].get(f"{name}@{at}")
        if c:
            lines.append(f"## {LABELS[name]} (NFE {c['nfe']:g})\n")
            lines += ["```\n" + t[:chars] + ("…" if len(t) > chars else "") + "\n```\n" for t in c["first_texts"]]
    write_text_atomic(path, "\n".join(lines) + "\n")


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mauve", "MAUVE", False), ("gen_ppl", "Gen PPL", True), ("entropy", "entropy (nats)", False)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title, logy) in zip(axes, panels):
        for name in SAMPLERS:
            pts = sorted((c["nfe"], c["metrics"][key]) for c in res["configs"].values()
                         if c["sampler"] == name and c["metrics"].get(key) is not None and c["nfe"] > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[name])
        ref = (res.get("reference") or {}).get(key)
        if ref is not None:
            ax.axhline(ref, color="black", ls="--", lw=1, label="real text")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("NFE (reported network passes)")
        ax.set_title(title)
        if not ax.lines:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[2].legend(fontsize=7)
    s = res["settings"]
    judge = s["judge"] if "gen_ppl" in s["metrics"] else "-"
    feat = s["featurizer"] if "mauve" in s["metrics"] else "-"
    fig.suptitle(f"Unconditional text, CPU scale: {s['n']} samples of {s['seq_len']} tokens, top_p {s['top_p']}; "
                 f"Gen PPL judge {judge}, MAUVE featurizer {feat}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve(path):
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO, path)


def check_args(p, args):
    """Every mistake that can be seen before sampling."""
    if any(n < 1 for n in args.nfe):
        p.error("--nfe values must be positive")
    if "prism_loop" in args.samplers and any(n % 2 for n in args.nfe):
        p.error(f"prism_loop splits N into N/2 steps + N/2 loop steps: every --nfe must be even, got {args.nfe}")
    if args.n < 1 or args.batch_size < 1 or not 0 < args.top_p <= 1:
        p.error("need --n >= 1, --batch-size >= 1 and 0 < --top-p <= 1")
    if "mauve" in args.metrics and args.n < 2:
        p.error("MAUVE needs --n >= 2")
    needed = [("mdm", args.mdm)] + ([("head", args.head)] if {"prism", "prism_loop"} & set(args.samplers) else [])
    for what, path in needed:
        if not os.path.isfile(resolve(path)):
            raise SystemExit(f"--{what} weights {path} not found; {HINT[what]}")
    cli.check_bindings(args.bind)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mdm", default="weights/owt/mdm.safetensors", help="the base text MDM's weights")
    p.add_argument("--head", default="weights/owt/prism_head.safetensors",
                   help="the PRISM head (a head-only file, or a fine-tune's full weights), loaded on top of --mdm")
    p.add_argument("--mdm-gin", default=MDM_GIN, help="the base MDM's gin file (full scale: gin/owt/mdlm_owt.gin)")
    p.add_argument("--prism-gin", default=PRISM_GIN, help="the PRISM model's gin file (full scale: gin/owt/prism_mdlm_owt.gin)")
    p.add_argument("--nfe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=SAMPLERS, metavar="NAME",
                   help=f"a subset of {', '.join(SAMPLERS)}")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--loop-remask", type=int, default=8, help="PRISM-loop's M (default L/16)")
    p.add_argument("--n", type=int, default=128, help="samples per configuration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=METRICS)
    p.add_argument("--judge", default="smollm2-135m", help="Gen PPL judge (offline default)")
    p.add_argument("--featurizer", default="minilm", help="MAUVE features (offline default)")
    p.add_argument("--samples-at", type=int, default=128, help="N whose samples go to owt_samples.md")
    p.add_argument("--out", default="benchmarks/results/owt_sweep")
    p.add_argument("--resume", action="store_true", help="keep finished configurations of OUT/owt_sweep.json")
    p.add_argument("--limit-minutes", type=float, default=None, help="start no configuration after this")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--bind", action="append", default=[], help="an extra gin binding for every configuration")
    args = p.parse_args(argv)
    args.samplers = [s for s in SAMPLERS if s in args.samplers]
    args.nfe = sorted(set(args.nfe))
    check_args(p, args)
    args.mdm, args.head = os.path.abspath(resolve(args.mdm)), os.path.abspath(resolve(args.head))
    return args


def start_results(args, argv, json_path: str, device) -> tuple:
    """The results so far (``--resume``: OUT/owt_sweep.json, refused if made with other settings) and
    this run's settings."""
    settings = {k: getattr(args, k) for k in ("mdm", "head", "mdm_gin", "prism_gin", "top_p", "loop_remask", "n", "batch_size", "seed",
                                              "metrics", "judge", "featurizer", "bind")}
    res = {"configs": {}, "reference": None}
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            res = json.load(f)
        same = {k: v for k, v in res["settings"].items() if k not in ("metrics", "seq_len")}
        if same != {k: v for k, v in settings.items() if k != "metrics"}:
            raise SystemExit(f"--resume: {json_path} was made with other settings ({same}); use another --out")
    settings["metrics"] = sorted(set(args.metrics) | {"entropy"})
    res.update(argv=sys.argv if argv is None else ["benchmarks/owt_sweep.py"] + list(argv),
               versions=cli.package_versions(VERSIONED),
               git=cli.git_commit(), device=str(device), threads=torch.get_num_threads())
    return res, settings


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_builtin_components()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "owt_sweep.json")
    res, settings = start_results(args, argv, json_path, device)

    exp = build(args, args.samplers[0], args.nfe[0])  # the task: references, decoding, seq_len
    task = exp.task
    settings["seq_len"] = task.seq_len
    res["settings"] = settings
    scorers = make_scorers(args, task)
    keys = wanted_keys(args)

    def save():
        write_text_atomic(json_path, json.dumps(res, indent=1))
        write_markdown(res, os.path.join(args.out, "owt_sweep.md"))
        write_samples(res, os.path.join(args.out, "owt_samples.md"), args.samples_at)
        plot(res, os.path.join(args.out, "owt_sweep.png"))

    t_start = time.time()
    if not res.get("reference") or any(k not in res["reference"] for k in keys):
        t0 = time.time()
        tok = task.tokenizer
        ref = reference_metrics(task.reference_texts(args.n, seed=args.seed), scorers,
                                tokenize=lambda t: tok(t, add_special_tokens=False)["input_ids"])
        res["reference"] = dict(ref, seconds=time.time() - t0)
        print(f"real text: {cell(ref)} ({time.time() - t0:.0f} s)", flush=True)
        save()
    todo = [(n, s) for n in args.nfe for s in args.samplers]
    for k, (n, name) in enumerate(todo):
        key = f"{name}@{n}"
        done = res["configs"].get(key)
        if done and all(m in done["metrics"] for m in keys):
            print(f"{key}: done already, skipped", flush=True)
            continue
        if args.limit_minutes is not None and time.time() - t_start > 60 * args.limit_minutes:
            print(f"--limit-minutes {args.limit_minutes} reached; not run: {[f'{s}@{m}' for m, s in todo[k:]]}")
            break
        exp = build(args, name, n)
        records, nfe, secs = sample(exp, args, device)
        t0 = time.time()
        metrics = run_scorers(scorers, records, key)
        res["configs"][key] = {"sampler": name, "nfe_target": n, "nfe": sum(nfe) / len(nfe), "nfe_per_batch": nfe,
                               "metrics": metrics, "seconds": secs, "seconds_metrics": time.time() - t0,
                               "first_texts": [r["text"] for r in records[:2]]}
        print(f"{key}: {cell(metrics)} NFE {sum(nfe) / len(nfe):g} ({secs:.0f} s sampling, "
              f"{time.time() - t0:.0f} s metrics)", flush=True)
        del exp
        save()
    save()
    print(open(os.path.join(args.out, "owt_sweep.md")).read())


if __name__ == "__main__":
    main()
