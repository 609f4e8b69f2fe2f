#!/usr/bin/env bash
# The GPU check: at most 5 minutes on one GPU. CI has no GPU, so a CUDA bug is invisible until
# someone runs this; contributors with a GPU run it before sending a change that touches training,
# sampling or the models, and paste what it prints (with the card's name) into docs/testing.md.
#
#   bash benchmarks/gpu_check.sh                       # from an installed checkout
#   PRISM_DATA=/path/to/shared/data bash benchmarks/gpu_check.sh   # data elsewhere than ../shared/data
#
# It needs the project's dependencies importable (pip install -e ., or PYTHONPATH=<checkout> plus
# torch, accelerate, transformers, gin-config, safetensors, tqdm, matplotlib, pytest) and the Sudoku
# files of shared/data. Steps, each timed, the script stopping at the first failure:
#   1. the default tests, single-process runs on CUDA (PRISM_TEST_DEVICE=cuda; multi-process tests
#      stay on CPU processes, as on a one-GPU machine they must);
#   2. train -> sample -> eval on CUDA in bf16 (200 steps of the Sudoku recipe from scratch);
#   3. the shipped Sudoku MDM on the 1000 dev puzzles on CUDA (fp32): success must be within 0.03
#      of the CPU's 0.113 (GPU kernels change the draws a little, not the model);
#   4. training throughput in bf16: sequences/s, fraction of the card's bf16 peak, peak memory;
#   5. LLaDA-architecture models (tiny and mid-sized, random weights): PRISM + LoRA training-step and
#      semi-AR sampling tokens/s under bf16 autocast (benchmarks/llada_speed.py; needs peft);
#   6. benchmarks/full_size.py's phases on its small LLaDA profile (released-layout shards, load,
#      train + resume, every sampler variant scored by the executor), each in a child process
#      (the 8B rehearsal itself: python benchmarks/full_size.py llada8b, about 20 GB of host memory).
# GPU_CHECK_QUICK=1 runs the same steps at toy sizes on whatever device there is (how the script is
# tried on a CPU before it is spent on a GPU); its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${GPU_CHECK_OUT:-runs/gpu_check}"
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - t0 )) s so far)"; }
QUICK="${GPU_CHECK_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  TRAIN_STEPS=10; BATCH=16; LIMIT=20; SHIPPED=50; TESTS="tests/test_faults.py"; BENCH=(--steps 2 --warmup 1 --presets test --batch-sizes 8)
  LLADA=(--configs tiny --repeats 1)
else
  TRAIN_STEPS=200; BATCH=256; LIMIT=500; SHIPPED=1000; TESTS=""; BENCH=(--steps 20 --presets cpu tiny --batch-sizes 256 1024)
  LLADA=(--configs tiny,mid --repeats 3 --device cuda)
fi
export GPU_CHECK_QUICK="$QUICK" TRAIN_STEPS LIMIT SHIPPED

step "environment"
python - <<'EOF'
import torch, accelerate, transformers
import os
if os.environ["GPU_CHECK_QUICK"] == "1" and not torch.cuda.is_available():
    print(f"no CUDA: quick trial on the CPU; torch {torch.__version__}")
    raise SystemExit(0)
assert torch.cuda.is_available(), "no CUDA device visible: this check is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), accelerate {accelerate.__version__}, transformers {transformers.__version__}")
EOF

step "1. default tests (single-process runs on CUDA)"
XDIST=""
if python -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
PRISM_TEST_DEVICE=cuda python -m pytest -q -m "not slow" -x $XDIST -p no:cacheprovider $TESTS 2>&1 | tail -4

step "2. train -> sample -> eval on CUDA, bf16"
COMMON=(--bind "run.mixed_precision = 'bf16'" --bind "tasks.sudoku.n_train_grids = 20000" --bind "evaluate.limit = $LIMIT")
python run.py train gin/sudoku/mdm.gin --output-dir "$OUT/smoke" --overwrite "${COMMON[@]}" \
    --bind "train.steps = $TRAIN_STEPS" --bind "train.batch_size = $BATCH" --bind "train.save_every = 100" \
    --bind "train.log_every = $(( TRAIN_STEPS / 4 ))" --bind "train.num_threads = None" 2>&1 | grep -v "it/s" | tail -3
python run.py sample gin/sudoku/mdm.gin --output-dir "$OUT/smoke" "${COMMON[@]}" 2>&1 | grep -v "it/s" | tail -2
python run.py eval gin/sudoku/mdm.gin --output-dir "$OUT/smoke" "${COMMON[@]}" 2>&1 | grep -v "it/s" | tail -5
python - "$OUT/smoke" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
info = json.load(open(os.path.join(out, "train_run_info.json")))
m = json.load(open(os.path.join(out, "metrics.json")))
quick = os.environ["GPU_CHECK_QUICK"] == "1"
assert (quick or info["device"].startswith("cuda")) and info["mixed_precision"] == "bf16", info
assert rows[-1]["step"] == int(os.environ["TRAIN_STEPS"]) and (quick or rows[-1]["loss"] < rows[0]["loss"]), (rows[0], rows[-1])
assert m["n"] == int(os.environ["LIMIT"]) and m["givens_kept"] == 1.0, m
print(f"trained on {info['device']} in bf16: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"{rows[-1]['seqs_per_s']:.0f} sequences/s; eval of 500 puzzles: success {m['success']:.3f} in {m['seconds']:.1f} s")
EOF

step "3. the shipped MDM on the 1000 dev puzzles, CUDA fp32"
python run.py eval gin/sudoku/mdm.gin --output-dir "$OUT/shipped" \
    --bind "experiment.init_checkpoint = 'weights/sudoku/mdm.safetensors'" --bind "evaluate.limit = $SHIPPED" 2>&1 | grep -v "it/s" | tail -4
python - "$OUT/shipped" <<'EOF'
import json, os, sys
m = json.load(open(os.path.join(sys.argv[1], "metrics.json")))
print(f"success {m['success']:.3f} on {m['n']} puzzles in {m['seconds']:.1f} s (CPU, 2 cores: 0.113 in 190 s)")
assert m["n"] == int(os.environ["SHIPPED"]) and (os.environ["GPU_CHECK_QUICK"] == "1" or abs(m["success"] - 0.113) <= 0.03), m
EOF

step "4. training throughput, bf16"
python benchmarks/gpu_throughput.py "${BENCH[@]}"

step "5. LLaDA-architecture PRISM + LoRA: training and semi-AR sampling tokens/s"
python benchmarks/llada_speed.py "${LLADA[@]}"

step "6. the full-size rehearsal's phases on a small LLaDA (load, train, resume, sample + executor)"
PRISM_ALLOW_CODE_EXECUTION=1 python benchmarks/full_size.py llada_small --cache "$OUT/full_size" \
    --out "$OUT/full_size" --redo weights load train resume mdm_step sample sample_full 2>&1 | grep -v "^  \[" | tail -22

step "done: every step passed in $(( $(date +%s) - t0 )) s"
