"""Fast semi-AR decoding (Fast-dLLM's KV cache and parallel decoding, with PRISM remasking): speed and
agreement on LLaDA-architecture models, and what it costs in accuracy on the Sudoku models.

    python benchmarks/fast_semi_ar.py speed --size mid      # none / prefix / dual x threshold x remasking
    python benchmarks/fast_semi_ar.py sudoku --limit 250    # success rate of the shipped Sudoku models
    python benchmarks/fast_semi_ar.py uncached --size mid   # the uncached sampler: full vs window-only logits

`speed` builds a randomly initialised LLaDA (`tiny`: the test preset; `mid`: d=512, 8 layers, 8 heads,
MLP 1536, a 32,768-token vocabulary, 61M parameters), a linear quality head with random weights, and
decodes `--gen-length` tokens after a `--prompt-length` prompt in blocks of `--block-length` with
`--steps` steps, greedy (LLaDA's setting), for every cache × threshold × remasking combination. It
reports tokens/s, passes, and the share of generated tokens equal to the uncached sampler's with the
same threshold and remasking (the cost of the cache's approximation) and to the plain uncached
sampler's. Random weights are rarely confident, so the threshold seldom fires here: its speed-up is
measured on the trained Sudoku models (`sudoku`), which also give the accuracy of every mode.
`sudoku` runs `samplers.semi_ar` on the shipped Sudoku MDM (remasking off) and the k-uniform PRISM
fine-tune (gin/sudoku/prism_kuniform.gin, K_block remasks by its head) over the dev puzzles.
`uncached` times the sampler without a KV cache twice per remasking setting: every pass's output layer
and SUBS softmax on all L positions (`window_logits = False`, the earlier path) and on the span of the
rows' blocks only (the default), and checks that both give the same tokens. Tokens/s everywhere count
generated tokens only (the non-fixed positions: never the prompt or padding). Writes OUT.md and OUT.json.
"""
import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CACHES = ("none", "prefix", "dual")
MID = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1536, vocab_size=32768,
           embedding_size=32768, max_sequence_length=4096)


def llada_model(size: str, seed: int = 0):
    from prism.backbones.llada import LLaDABackbone
    from prism.heads.quality import LinearHead
    from prism.model import MDM

    torch.manual_seed(seed)
    backbone = LLaDABackbone(preset="tiny") if size == "tiny" else LLaDABackbone(preset="tiny", config=MID)
    model = MDM(backbone, head=LinearHead).eval()
    with torch.no_grad():  # the head's output layer starts at zero: give it an opinion
        for p in model.head.parameters():
            p.normal_(0.0, 0.3)
    return model


def prompt_batch(model, prompt_length: int, gen_length: int, batch_size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.mask_id, (batch_size, prompt_length), generator=g)
    ids = torch.cat([prompt, torch.full((batch_size, gen_length), model.mask_id)], 1)
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, :prompt_length] = True
    return {"input_ids": ids, "fixed": fixed}


def speed(args) -> dict:
    from prism.samplers.semi_ar import semi_ar_sampler

    torch.set_num_threads(args.threads)
    model = llada_model(args.size)
    batch = prompt_batch(model, args.prompt_length, args.gen_length, args.batch_size)
    n_blocks = -(-args.gen_length // args.block_length)  # warm-up at full length: one step per block
    semi_ar_sampler(steps=n_blocks, block_length=args.block_length)(model, batch, torch.Generator().manual_seed(0))
    rows, outputs = [], {}
    for remask, threshold, cache in itertools.product((0, args.k_block), (None, args.threshold), CACHES):
        sampler = semi_ar_sampler(steps=args.steps, block_length=args.block_length, remask_per_block=remask,
                                  threshold=threshold, cache=cache)
        start = time.perf_counter()
        out = sampler(model, batch, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        gen = out.tokens[:, args.prompt_length:]  # the generated positions (no padding in this batch)
        assert gen.numel() == generated(batch)
        outputs[(remask, threshold, cache)] = gen
        same = outputs[(remask, threshold, "none")]
        plain = outputs[(remask, None, "none")]
        rows.append(dict(cache=cache, threshold=threshold, remask_per_block=remask, seconds=seconds, nfe=out.nfe,
                         tokens_per_s=gen.numel() / seconds, agree_uncached=float((gen == same).float().mean()),
                         agree_plain=float((gen == plain).float().mean())))
        print(f"cache={cache:6s} threshold={threshold} K_block={remask}: {seconds:7.2f} s, "
              f"{rows[-1]['tokens_per_s']:7.1f} tok/s, NFE {out.nfe}", flush=True)
    base = {(r["remask_per_block"]): r["seconds"] for r in rows if r["cache"] == "none" and r["threshold"] is None}
    for r in rows:
        r["speedup"] = base[r["remask_per_block"]] / r["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    return dict(rows=rows, parameters=n_params)


def generated(batch) -> int:
    """The number of generated tokens of a batch: its non-fixed positions (what tokens/s counts)."""
    return int((~batch["fixed"].bool()).sum())


def uncached(args) -> dict:
    """The uncached sampler with the output layer and SUBS on all L positions vs on the window's span."""
    from prism.samplers.semi_ar import semi_ar_sampler

    torch.set_num_threads(args.threads)
    model = llada_model(args.size)
    batch = prompt_batch(model, args.prompt_length, args.gen_length, args.batch_size)
    n_blocks = -(-args.gen_length // args.block_length)
    semi_ar_sampler(steps=n_blocks, block_length=args.block_length)(model, batch, torch.Generator().manual_seed(0))
    rows = []
    for remask in (0, args.k_block):
        tokens = {}
        for window_logits in (False, True):
            sampler = semi_ar_sampler(steps=args.steps, block_length=args.block_length, remask_per_block=remask)
            sampler.window_logits = window_logits
            start = time.perf_counter()
            out = sampler(model, batch, torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
            tokens[window_logits] = out.tokens
            rows.append(dict(remask_per_block=remask, window_logits=window_logits, seconds=seconds, nfe=out.nfe,
                             tokens_per_s=generated(batch) / seconds))
            print(f"K_block={remask} window_logits={window_logits}: {seconds:7.2f} s, "
                  f"{rows[-1]['tokens_per_s']:7.1f} tok/s, NFE {out.nfe}", flush=True)
        rows[-1]["same_tokens"] = bool(torch.equal(tokens[False], tokens[True]))
        rows[-1]["speedup"] = rows[-2]["seconds"] / seconds
    return dict(rows=rows, parameters=sum(p.numel() for p in model.parameters()))


def uncached_table(result: dict, args) -> str:
    lines = [f"LLaDA architecture, `{args.size}` ({result['parameters'] / 1e6:.1f}M parameters, random weights), "
             f"no KV cache, prompt {args.prompt_length} + {args.gen_length} generated tokens, blocks of "
             f"{args.block_length}, {args.steps} steps, greedy, batch {args.batch_size}, {args.threads} CPU "
             "thread(s). Output layer + SUBS softmax on all positions (before) vs on the block's span (after).", "",
             "| remasking | output layer on | NFE | s | tokens/s | speed-up | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rem = f"PRISM, K_block = {r['remask_per_block']}" if r["remask_per_block"] else "off"
        on = "the block's span" if r["window_logits"] else "all positions"
        same = "yes" if r.get("same_tokens") else "NO"
        extra = f"{r['speedup']:.2f}× | {same}" if r["window_logits"] else "1.00× | –"
        lines.append(f"| {rem} | {on} | {r['nfe']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {extra} |")
    return "\n".join(lines) + "\n"


def speed_table(result: dict, args) -> str:
    lines = [f"LLaDA architecture, `{args.size}` ({result['parameters'] / 1e6:.1f}M parameters, random weights), "
             f"prompt {args.prompt_length} + {args.gen_length} generated tokens, blocks of {args.block_length}, "
             f"{args.steps} steps, greedy, batch {args.batch_size}, {args.threads} CPU thread(s). Speed-up against "
             "the uncached sampler with the same remasking; agreement: share of generated tokens equal to the "
             "uncached sampler's with the same threshold and remasking / to the plain uncached sampler's.", "",
             "| remasking | threshold | cache | NFE | s | tokens/s | speed-up | agreement (same τ) | agreement (plain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rem = f"PRISM, K_block = {r['remask_per_block']}" if r["remask_per_block"] else "off"
        tau = "off" if r["threshold"] is None else f"{r['threshold']}"
        lines.append(f"| {rem} | {tau} | {r['cache']} | {r['nfe']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['agree_uncached']:.3f} | {r['agree_plain']:.3f} |")
    return "\n".join(lines) + "\n"


def sudoku(args) -> dict:
    """Success rate of semi-AR decoding on the dev puzzles in every mode: one `run.py eval` per row
    (printed, so any row can be re-run alone), its metrics.json read back."""
    import subprocess

    rows = []
    models = [("MDM", "gin/sudoku/mdm.gin", "weights/sudoku/mdm.safetensors", 0),
              ("PRISM", "gin/sudoku/prism_kuniform.gin", "weights/sudoku/prism_kuniform.safetensors", args.k_block)]
    for (name, config, weights, remask), threshold, cache in itertools.product(models, (None, args.threshold), CACHES):
        out = os.path.join(args.runs, f"{name.lower()}_{cache}_{'tau' if threshold else 'plain'}")
        cmd = [sys.executable, "run.py", "eval", config, "--output-dir", out,
               "--bind", f"experiment.init_checkpoint = '{weights}'", "--bind", "experiment.init_new = []",
               "--bind", "experiment.sampler = @samplers.semi_ar()", "--bind", f"samplers.semi_ar.steps = {args.steps}",
               "--bind", f"samplers.semi_ar.block_length = {args.block_length}",
               "--bind", f"samplers.semi_ar.remask_per_block = {remask}",
               "--bind", "samplers.semi_ar.remask_rule = @remask_rules.prism()",
               "--bind", f"samplers.semi_ar.cache = '{cache}'", "--bind", f"samplers.semi_ar.threshold = {threshold}",
               "--bind", f"evaluate.limit = {args.limit}", "--bind", f"evaluate.batch_size = {args.batch_size}"]
        print(" ".join(cmd[1:]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run(cmd, cwd=REPO, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        metrics = metrics.get("eval", metrics)
        rows.append(dict(model=name, cache=cache, threshold=threshold, remask_per_block=remask,
                         **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    return dict(rows=rows)


def sudoku_table(result: dict, args) -> str:
    lines = [f"The shipped Sudoku models, {args.limit} dev puzzles, semi-AR blocks of {args.block_length} cells, "
             f"{args.steps} steps, greedy, most confident first; PRISM: the k-uniform fine-tune "
             f"(weights/sudoku/prism_kuniform.safetensors), {args.k_block} remasks per block by its head. "
             f"Seconds: sampling the puzzles with {args.threads} CPU thread(s).", "",
             "| model | threshold | cache | success | NFE per batch | s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tau = "off" if r["threshold"] is None else f"{r['threshold']}"
        success = r.get("success", r.get("accuracy", float("nan")))
        lines.append(f"| {r['model']} | {tau} | {r['cache']} | {success:.3f} | {r.get('nfe', float('nan')):.1f} | "
                     f"{r.get('seconds', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("speed", "sudoku", "uncached"))
    parser.add_argument("--size", choices=("tiny", "mid"), default="mid")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=512)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--k-block", type=int, default=4, help="PRISM remasks per block")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--limit", type=int, default=250, help="sudoku: dev puzzles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/fast_semi_ar", help="sudoku: the eval output directories")
    parser.add_argument("--out", default=None, help="OUT.md / OUT.json (default benchmarks/results/fast_semi_ar_<part>)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"fast_semi_ar_{args.part}"
                                   + (f"_{args.size}" if args.part != "sudoku" else ""))
    parts = {"speed": (speed, speed_table), "sudoku": (sudoku, sudoku_table), "uncached": (uncached, uncached_table)}
    run_part, table = parts[args.part]
    result = run_part(args)
    result.update(argv=sys.argv, torch=torch.__version__, python=platform.python_version(),
                  cpu=platform.processor() or platform.machine())
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table(result, args))
    print(f"wrote {out}.json")


if __name__ == "__main__":
    main()
