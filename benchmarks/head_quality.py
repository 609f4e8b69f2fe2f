"""How well do the three quality signals tell wrong Sudoku fills from right ones? The PRISM head, the
Token-Critic and the MDM's own confidence at fill time (the ReMDM-conf proxy), scored on the same
boards, cells and draws (see ``prism/evaluation/quality.py``): AUROC, expected calibration error and a
reliability plot.

    python benchmarks/head_quality.py --prism runs/prism --critic runs/token_critic \
        [--mdm weights/sudoku/mdm.safetensors] [--k 4] [--limit 2000] \
        [--out benchmarks/results/head_quality]

Boards: the 2000 solved validation grids (``easy_sudokus_answer_valid.csv``) with the task's seeded
clue sets, masked as in training. ``--prism`` / ``--critic``: a training run directory (its last
checkpoint), a checkpoint directory, or a .safetensors file. The filler is the MDM of ``--mdm``.
Writes OUT.md (the table), OUT.json (numbers and reliability bins) and OUT.png (reliability plot).
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gin  # noqa: E402
import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.training.checkpoints import list_checkpoints  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.evaluation.quality import collect, summarise  # noqa: E402
from registry import load_builtin_components  # noqa: E402

LABELS = {"prism": "PRISM head g_i(y)", "token_critic": "Token-Critic on x̂", "confidence": "MDM confidence p(x̂_i | z)"}


def weights_of(path: str) -> str:
    """A run directory → its last checkpoint's weights; a checkpoint directory or file as is."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise SystemExit(f"{path} has no complete checkpoint")
        path = ckpts[-1]
    return path


def build(gin_file: str, weights: str, binds=()):
    gin.clear_config()
    cli.parse_gin([gin_file], [f"experiment.init_checkpoint = '{weights}'", "experiment.init_new = []",
                               "tasks.sudoku.n_train_grids = 10", "tasks.sudoku.cache_dir = None", *binds])
    exp = build_experiment()
    return exp.model.eval(), exp.task


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for name, row in table.items():
        conf = torch.tensor(row["bins"]["confidence"])
        freq = torch.tensor(row["bins"]["frequency"])
        ok = ~torch.isnan(conf)
        ax.plot(conf[ok], freq[ok], marker="o",
                label=f"{LABELS.get(name, name)}: AUROC {row['auroc']:.3f}, ECE {row['ece']:.3f}")
    ax.set_xlabel("predicted probability that the fill is right")
    ax.set_ylabel("observed fraction right")
    ax.set_title("Sudoku: reliability of the quality signals")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prism", help="PRISM fine-tune (run dir, checkpoint dir or .safetensors)")
    p.add_argument("--critic", help="Token-Critic run (run dir, checkpoint dir or .safetensors)")
    p.add_argument("--mdm", default="weights/sudoku/mdm.safetensors", help="the MDM that fills the cells")
    p.add_argument("--k", type=int, default=4, help="scored fills per board (Algorithm 1's k)")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/head_quality")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_builtin_components()
    filler, task = build("sudoku/mdm.gin", args.mdm)
    prism_model = build("sudoku/prism.gin", weights_of(args.prism))[0] if args.prism else None
    critic_model = build("sudoku/token_critic.gin", weights_of(args.critic))[0] if args.critic else None
    signals = collect(task.valid_batches(args.batch_size, args.limit), filler, args.seed, args.k,
                      prism_model, critic_model)
    table = summarise(signals)
    n = table["confidence"]["n"]
    lines = [f"Quality signals on {args.limit} validation boards, {args.k} scored fills per board "
             f"({n} fills, {table['confidence']['accuracy']:.1%} of them right); filler {args.mdm}",
             "", "| signal | AUROC (right vs wrong) | ECE | mean predicted | observed accuracy |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {LABELS.get(name, name)} | {row['auroc']:.3f} | {row['ece']:.3f} | "
                     f"{row['mean_pred']:.3f} | {row['accuracy']:.3f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n\nCommand: python " + " ".join(sys.argv) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "table": table}, f, indent=1)
    plot(table, args.out + ".png")
    print(f"wrote {args.out}.md, .json, .png")


if __name__ == "__main__":
    main()
