import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from registry import load_builtin_components  # noqa: E402

load_builtin_components()

# A CPU-minute Sudoku experiment: the real base.gin with a test-sized DiT and few steps.
TINY_GIN = """
include 'sudoku/base.gin'
DIT_PRESET = 'test'
STEPS = 6
tasks.sudoku.n_train_grids = 256
tasks.sudoku.cache_dir = None
train.steps = 8
train.batch_size = 8
train.lr = 1e-3
train.log_every = 2
train.save_every = 4
train.num_threads = 1
evaluate.limit = 12
evaluate.batch_size = 5
"""


@pytest.fixture
def tiny_gin(tmp_path):
    path = tmp_path / "tiny.gin"
    path.write_text(TINY_GIN)
    return str(path)


# Tests pin the device they mean. Runs started by the tests use the CPU unless PRISM_TEST_DEVICE=cuda
# (benchmarks/gpu_check.sh sets it to run the single-process end-to-end tests on a GPU).
TEST_DEVICE = os.environ.get("PRISM_TEST_DEVICE", "cpu")
DEVICE_ENV = {} if TEST_DEVICE == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
# Several processes on one machine: always CPU processes over gloo (a one-GPU machine has no cuda:1).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CPU_PROCESSES_ENV = {"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}


def run_py(args, cwd=REPO, env=None, timeout=600, launcher=None, check=True):
    """Run ``run.py`` in a subprocess on the test device; fail with its output if it fails (unless
    ``check=False``: then return the finished process)."""
    full_env = dict(os.environ, PYTHONHASHSEED="0", **DEVICE_ENV)
    full_env.update(env or {})
    cmd = (launcher or [sys.executable]) + [os.path.join(REPO, "run.py")] + list(args)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


META_8B = ["backbones.llada.model_name_or_path = None", "backbones.llada.preset = '8b'", "backbones.llada.device = 'meta'"]


def compose_on_meta(gin_file, *builds, binds=(), queries=()):
    """Parse ``gin_file`` with LLaDA-8B on the meta device (nothing read or allocated) and ``binds``;
    return the configurables ``builds`` called (e.g. 'models.mdm', 'samplers.semi_ar') and the values
    of the gin parameters ``queries``, with the gin config cleared afterwards."""
    import gin

    from prism import cli

    gin.clear_config()
    try:
        cli.parse_gin([gin_file], META_8B + list(binds))
        return [gin.get_configurable(b)() for b in builds], [gin.query_parameter(q) for q in queries]
    finally:
        gin.clear_config()
