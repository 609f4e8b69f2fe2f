"""Our semi-AR PRISM sampler against the PRISM authors' released ``llada_inference``: same weights, same
decisions, tokens checked equal, speed ratio (ours / theirs, generated tokens per second).

    git --git-dir=/work/.mirror/SeunggeunKimkr+PRISM/repo archive HEAD PRISM_llada | tar -x -C /tmp/prism_authors
    python benchmarks/authors_speed.py --prism-repo /tmp/prism_authors --load-note "..."   # the measurement
    python benchmarks/authors_speed.py --prism-repo /tmp/prism_authors --tiny              # seconds, no files

Their code (github.com/SeunggeunKimkr/PRISM, ``PRISM_llada/sampling.py``) is not copied here: it is loaded
from ``--prism-repo`` at run time (by file path: its module name ``sampling`` would clash with
``benchmarks/sampling.py``). The model: a randomly initialised (seeded) LLaDA-architecture ``MDM`` (sizes of
``fast_semi_ar.py``'s ``mid``: 60.8M backbone parameters) with ``heads.mlp`` (their ``RemaskingHead``:
LayerNorm, Linear, GELU, Linear), float32, 1 thread. The adapter gives ``llada_inference`` what their
``RemaskingLLaDA`` gives it, backed by our model: ``model(x)`` returns ``{"logits": (B, L, V) from our
backbone's output layer on every position (what the HF LLaDA model returns), "remasking_conf": our head's
quality logits (B, L, 1)}``; prompts are right-filled with ``pad_token_id`` = the mask id.

Same decisions (docs/samplers.md, gin/samplers/semi_ar_prism_authors.gin): ours runs
``semi_ar_sampler(remask_spread='central', remask_rule=PRISMRemask())``, uncached, window logits (default).
Their settings that make the decisions equal, token for token:
- steps: they count blocks over the whole row (prompt included), ``steps_per_block = steps // (L // block)``,
  so they get ``steps / n_generated_blocks * (L // block)`` (64 -> 80 at 64 + 256, blocks of 32); L must be a
  multiple of the block and the generated blocks must divide ``--steps``.
- their sampler runs under bf16 autocast on the CPU; the adapter turns autocast off (float32 like ours;
  bf16 would change the argmaxes). The mask token's logit is set to -inf (our SUBS; the HF model leaves it).
- K_block (``--k-block``, default 4) <= steps per block - 2: with the central budget the first and last step
  of a block then remask nothing. Otherwise two corner cases of theirs differ from ours (docs/samplers.md):
  at a block's first step nothing is clean yet, but they still unmask the share + the planned remasks, and a
  remask at the last step is never refilled (masks left in the output). With 8 steps per block the paper's
  K_block = 12 hits both (12 // 8 = 1 on every step); then the script reports the fraction of equal tokens.
Ties in the confidences (they rank float32 softmax probabilities, we log-probs) could order differently;
with random float32 weights none occurred. Tokens/s counts generated tokens only.
"""
import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from fast_semi_ar import MID, prompt_batch  # noqa: E402

TINY = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=128, prompt_length=16,
            gen_length=64, block_length=16, steps=32, repeats=1)


def build_model(args):
    from prism.backbones.llada import LLaDABackbone
    from prism.heads.quality import MLPHead
    from prism.model import MDM

    torch.manual_seed(args.seed)
    config = dict(MID, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                  mlp_hidden_size=args.mlp_hidden_size, vocab_size=args.vocab_size, embedding_size=args.vocab_size)
    model = MDM(LLaDABackbone(preset=None, config=config), head=MLPHead).eval()
    with torch.no_grad():  # the head's output layer starts at zero: give it an opinion
        for p in model.head.net[-1].parameters():
            p.normal_(0.0, 0.3)
    return model


def load_authors(prism_repo: str):
    path = os.path.join(prism_repo, "PRISM_llada", "sampling.py")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: --prism-repo must be a checkout of SeunggeunKimkr/PRISM")
    spec = importlib.util.spec_from_file_location("prism_authors_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.llada_inference


class AuthorsModel(nn.Module):
    """What ``llada_inference`` calls (their ``RemaskingLLaDA``): full-sequence logits + head confidence."""

    def __init__(self, mdm):
        super().__init__()
        self.mdm = mdm

    def forward(self, input_ids):
        with torch.autocast(input_ids.device.type, enabled=False):
            out = self.mdm.backbone(input_ids)
            logits = out.logits
            logits[..., self.mdm.mask_id] = float("-inf")
            conf = self.mdm.head(out.hidden_states, out.cond, None)
        return {"logits": logits, "remasking_conf": conf[..., None]}


def run_ours(model, batch, args):
    from prism.samplers.remask import PRISMRemask
    from prism.samplers.semi_ar import semi_ar_sampler

    sampler = semi_ar_sampler(steps=args.steps, block_length=args.block_length, remask_per_block=args.k_block,
                              remask_spread="central", remask_rule=PRISMRemask())
    with torch.no_grad():
        return sampler(model, batch, torch.Generator().manual_seed(0)).tokens


def run_theirs(llada_inference, adapter, batch, args):
    L = batch["input_ids"].shape[1]
    their_steps = args.steps // (args.gen_length // args.block_length) * (L // args.block_length)
    tokenizer = type("Tokenizer", (), {"pad_token_id": adapter.mdm.mask_id})()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # print + tqdm
        return llada_inference(adapter, batch["input_ids"], tokenizer, their_steps, L, "PRISM", args.block_length,
                               "prob_max", args.k_block > 0, "prism", args.k_block, 0.0, mask_id=adapter.mdm.mask_id)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), times


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head + (" (uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def table(r: dict) -> str:
    a = r["args"]
    lines = [f"Our `samplers.semi_ar` (uncached, window logits, PRISM remasking by `heads.mlp`, K_block = "
             f"{a['k_block']} 'central') against the PRISM authors' `llada_inference` (PRISM_llada/sampling.py, "
             f"loaded from a checkout, model through an adapter) on the same LLaDA-architecture model "
             f"({r['parameters'] / 1e6:.1f}M parameters incl. head, random weights, seed {a['seed']}), float32, "
             f"greedy, batch {a['batch_size']}, prompt {a['prompt_length']} + {a['gen_length']} generated tokens, "
             f"blocks of {a['block_length']}, {a['steps']} steps, {a['threads']} thread(s). Median of "
             f"{a['repeats']} runs after a warm-up; tokens/s of generated tokens.", "",
             "| sampler | s (median) | tokens/s |", "|---|---|---|",
             f"| ours | {r['ours_s']:.2f} | {r['ours_tok_s']:.1f} |",
             f"| authors' llada_inference | {r['theirs_s']:.2f} | {r['theirs_tok_s']:.1f} |", "",
             f"Speed ratio (ours / theirs): **{r['ratio']:.2f}×**. Tokens equal: "
             f"{'yes, all' if r['tokens_equal'] else 'NO'} ({r['equal_fraction']:.4f} of generated tokens).", "",
             f"Machine: {r['machine']}. Load: {r['load_note']}. torch {r['torch']}, Python {r['python']}, "
             f"{r['date']}, commit {r['commit']}, PRISM checkout {r['prism_commit']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prism-repo", required=True, help="checkout of SeunggeunKimkr/PRISM (with PRISM_llada/)")
    p.add_argument("--d-model", type=int, default=MID["d_model"])
    p.add_argument("--n-layers", type=int, default=MID["n_layers"])
    p.add_argument("--n-heads", type=int, default=MID["n_heads"])
    p.add_argument("--mlp-hidden-size", type=int, default=MID["mlp_hidden_size"])
    p.add_argument("--vocab-size", type=int, default=MID["vocab_size"])
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--k-block", type=int, default=4, help="PRISM remasks per block (<= steps per block - 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-note", default="not stated", help="the machine's load during the run")
    p.add_argument("--tiny", action="store_true", help="a seconds-long correctness run (tiny model, no files)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "authors_speed"))
    args = p.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    n_blocks, L = args.gen_length // args.block_length, args.prompt_length + args.gen_length
    if args.gen_length % args.block_length or L % args.block_length or args.steps % n_blocks:
        raise SystemExit("prompt + generated and generated lengths must be multiples of --block-length, and "
                         "--steps a multiple of the generated blocks (their block / step plan)")
    torch.set_num_threads(args.threads)
    llada_inference = load_authors(args.prism_repo)
    model = build_model(args)
    batch = prompt_batch(model, args.prompt_length, args.gen_length, args.batch_size)
    adapter = AuthorsModel(model).eval()
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, prompt {args.prompt_length} + {args.gen_length}, blocks of "
          f"{args.block_length}, {args.steps} steps, K_block = {args.k_block}, {args.threads} thread(s)", flush=True)
    ours, ours_s, ours_all = timed(lambda: run_ours(model, batch, args), args.repeats)
    print(f"ours:   {ours_s:7.2f} s, {args.batch_size * args.gen_length / ours_s:8.1f} tok/s", flush=True)
    theirs, theirs_s, theirs_all = timed(lambda: run_theirs(llada_inference, adapter, batch, args), args.repeats)
    print(f"theirs: {theirs_s:7.2f} s, {args.batch_size * args.gen_length / theirs_s:8.1f} tok/s", flush=True)
    gen = slice(args.prompt_length, None)
    equal = float((ours[:, gen] == theirs[:, gen]).float().mean())
    same = bool(torch.equal(ours, theirs))
    left = int((theirs == model.mask_id).sum())
    r = dict(ours_s=ours_s, theirs_s=theirs_s, ours_times=ours_all, theirs_times=theirs_all,
             ours_tok_s=args.batch_size * args.gen_length / ours_s,
             theirs_tok_s=args.batch_size * args.gen_length / theirs_s, ratio=theirs_s / ours_s,
             tokens_equal=same, equal_fraction=equal, masks_left_by_theirs=left, parameters=n_params)
    print(f"ratio (ours / theirs, tokens/s): {r['ratio']:.2f}x; tokens equal: {same} ({equal:.4f}); "
          f"masks left by theirs: {left}")
    if args.tiny:
        return r
    prism_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.prism_repo, capture_output=True,
                                  text=True).stdout.strip() or "unknown (an archive)"
    r.update(args={k: v for k, v in vars(args).items() if k != "out"}, argv=sys.argv, machine=machine(),
             threads=args.threads, torch=torch.__version__, python=platform.python_version(),
             date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
             prism_commit=prism_commit, load_note=args.load_note)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(r, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table(r))
    print(f"wrote {args.out}.md and {args.out}.json")
    return r


if __name__ == "__main__":
    main()
