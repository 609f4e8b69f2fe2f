"""The Sudoku sampler comparison (the paper's Figure 3, on this machine): success rate on the dev
puzzles for the vanilla MDM, ReMDM-conf, ReMDM-cap, Token-Critic and PRISM, plus a sweep over PRISM's
K and the number of steps T. Every row is one `python run.py eval` command (printed, with its output
directory under --out), so any row can be re-run alone.

    python benchmarks/sudoku_samplers.py [--limit 1000] [--rows main|sweep|fix|all] [--only TEXT] [--out runs/sudoku_samplers]

Weights: weights/sudoku/mdm.safetensors (vanilla, ReMDM), weights/sudoku/token_critic.safetensors,
weights/sudoku/prism.safetensors; the `fix` rows also weights/sudoku/prism_kuniform.safetensors and, for one
row, runs/prism_long (made by resuming the PRISM run to 1800 steps; see the README). Writes OUT/table.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MDM, TC, PRISM = "weights/sudoku/mdm.safetensors", "weights/sudoku/token_critic.safetensors", "weights/sudoku/prism.safetensors"
# name, model gin, sampler gin (None: the MDLM sampler of base.gin), weights, extra bindings
MAIN = [
    ("vanilla MDM (MDLM sampler)", "gin/sudoku/mdm.gin", None, MDM, []),
    ("ReMDM-conf", "gin/sudoku/mdm.gin", "gin/samplers/remdm_conf.gin", MDM, []),
    ("ReMDM-cap, η = 0.02", "gin/sudoku/mdm.gin", "gin/samplers/remdm.gin", MDM, []),
    ("Token-Critic", "gin/sudoku/token_critic.gin", "gin/samplers/token_critic.gin", TC, []),
    ("PRISM fine-tune, MDLM sampler (no remasking)", "gin/sudoku/prism.gin", None, PRISM, []),
    ("PRISM, K = 4", "gin/sudoku/prism.gin", "gin/samplers/prism.gin", PRISM, []),
]
SWEEP = [(f"PRISM, K = {k}", "gin/sudoku/prism.gin", "gin/samplers/prism.gin", PRISM, [f"NUM_REMASK = {k}"]) for k in (1, 2, 8)]
SWEEP += [("vanilla MDM, T = 101", "gin/sudoku/mdm.gin", None, MDM, ["STEPS = 101"]),
          ("PRISM, K = 4, T = 101", "gin/sudoku/prism.gin", "gin/samplers/prism.gin", PRISM, ["STEPS = 101"])]
# closing the gap to Token-Critic (README, "Fixing the gap"): the head trained with k ~ U{1..#masked}
# fills (gin/sudoku/prism_kuniform.gin); the k = 4 recipe trained twice as long (the step-1800
# checkpoint of `--resume`d runs/prism, not shipped); Algorithm 3 with the MDM's own signals instead
# of a head (which part of the gain is the schedule)
KUNI, LONG = "weights/sudoku/prism_kuniform.safetensors", "runs/prism_long/checkpoints/step_00001800/weights.safetensors"
ALG3 = ("gin/sudoku/mdm.gin", "gin/samplers/prism.gin", MDM)  # Algorithm 3 on the MDM, no head
PK = ("gin/sudoku/prism.gin", "gin/samplers/prism.gin", KUNI)  # Algorithm 3 with the k-uniform head
CONFIDENT = "samplers.prism.unmask_rule = @unmask_rules.confidence()"
FIX = [("PRISM k-uniform, MDLM sampler (no remasking)", "gin/sudoku/prism.gin", None, KUNI, []),
       ("PRISM k-uniform, K = 4", *PK, []),
       ("PRISM k-uniform, K = 8", *PK, ["NUM_REMASK = 8"]),
       ("PRISM k-uniform, K = 4, T = 101", *PK, ["STEPS = 101"]),
       ("PRISM k-uniform, K = 4, + PRISM-loop N_l = 50, M = 4, lowest quality", *PK,
        ["samplers.prism.loop_steps = 50", "samplers.prism.loop_remask = 4", "samplers.prism.loop_choice = 'lowest'"]),
       ("Algorithm 3, K = 4, MDM confidence at unmask time", *ALG3,
        ["samplers.prism.remask_rule = @remask_rules.low_confidence()"]),
       ("Algorithm 3, K = 4, MDM current probability (P2-self)", *ALG3,
        ["samplers.prism.remask_rule = @remask_rules.p2_self()"]),
       ("PRISM k = 4 trained 1800 steps, K = 4", "gin/sudoku/prism.gin", "gin/samplers/prism.gin", LONG, []),
       # the unmasking rule: most confident first instead of uniformly random (the paper's Algorithm 3)
       ("MDM, most-confident unmasking, no remasking", *ALG3, ["NUM_REMASK = 0", CONFIDENT]),
       ("PRISM k-uniform, K = 4, most-confident unmasking", *PK, [CONFIDENT]),
       ("PRISM k-uniform checkpoint, most-confident unmasking, no remasking", *PK, ["NUM_REMASK = 0", CONFIDENT])]


def slug(name):
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--rows", choices=["main", "sweep", "fix", "all"], default="all")
    p.add_argument("--out", default="runs/sudoku_samplers")
    p.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    args = p.parse_args()
    rows = {"main": MAIN, "sweep": SWEEP, "fix": FIX, "all": MAIN + SWEEP + FIX}[args.rows]
    rows = [r for r in rows if args.only is None or args.only in r[0]]
    missing = sorted({r[3] for r in rows if not os.path.exists(os.path.join(REPO, r[3]))})
    if missing:
        raise SystemExit(f"weights not found: {', '.join(missing)} (see the README for the runs that make them)")
    lines = ["| sampler | weights | success | units valid | NFE per batch | seconds |", "|---|---|---|---|---|---|"]
    for name, model_gin, sampler_gin, weights, binds in rows:
        out = os.path.join(args.out, slug(name))
        cmd = [sys.executable, "run.py", "eval", model_gin] + ([sampler_gin] if sampler_gin else [])
        for b in [f"experiment.init_checkpoint = '{weights}'", "experiment.init_new = []", f"evaluate.limit = {args.limit}"] + binds:
            cmd += ["--bind", b]
        cmd += ["--output-dir", out]
        print("$ " + " ".join(c if " " not in c else f'"{c}"' for c in cmd[1:]), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        m = json.load(open(os.path.join(REPO, out, "metrics.json")))
        lines.append(f"| {name} | {os.path.basename(weights)} | {m['success']:.3f} | {m['units_valid']:.3f} | "
                     f"{m['nfe']:.1f} | {m['seconds']:.0f} |")
        print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
    text = f"Sudoku dev puzzles (first {args.limit}), T = 51 unless said\n\n" + "\n".join(lines)
    print(text)
    with open(os.path.join(REPO, args.out, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
