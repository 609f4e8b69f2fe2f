import os
import subprocess
import sys


from conftest import REPO


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_local_gin_folder_does_not_shadow_the_package():
    proc = subprocess.run([sys.executable, "-c", "import gin; print(gin.__file__); gin.configurable; gin.parse_config"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.path.join(REPO, "gin") not in proc.stdout.strip()
    assert proc.stdout.strip().endswith(os.path.join("gin", "__init__.py"))


def test_typo_in_a_component_name_says_what_was_meant():
    proc = run_cli("train", "gin/sudoku/mdm.gin", "--bind", "experiment.sampler = @samplers.mdml()")
    assert proc.returncode != 0
    assert "Did you mean 'samplers.mdlm'?" in proc.stderr
    assert "Known samplers: samplers.dfm, samplers.loop, samplers.mdlm, samplers.prism" in proc.stderr


def test_typo_in_a_kind_and_in_a_parameter():
    proc = run_cli("train", "gin/sudoku/mdm.gin", "--bind", "backbone.dit.n_blocks = 2")
    assert proc.returncode != 0 and "Did you mean 'backbones.dit'?" in proc.stderr
    proc = run_cli("train", "gin/sudoku/mdm.gin", "--bind", "samplers.mdlm.stepz = 3")
    assert proc.returncode != 0 and "Did you mean 'samplers.mdlm.steps'?" in proc.stderr


def test_missing_gin_file_is_reported():
    proc = run_cli("train", "gin/sudoku/nope.gin")
    assert proc.returncode != 0 and "gin file 'gin/sudoku/nope.gin' not found" in proc.stderr


def test_composition_include_chain_and_macros(tmp_path):
    """quickstart_finetune.gin includes mdm.gin includes base.gin includes models/ and samplers/: the
    macros reach the components, and a run file can override them; works from any directory."""
    code = f"""
import sys; sys.path.insert(0, {REPO!r})
import gin
from prism import cli
from registry import load_builtin_components
load_builtin_components()
cli.parse_gin(['sudoku/quickstart_finetune.gin'], ['STEPS = 77'])
print(gin.query_parameter('samplers.mdlm.steps'), gin.query_parameter('%STEPS'),
      gin.query_parameter('backbones.dit.preset'), gin.query_parameter('%DIT_PRESET'),
      gin.query_parameter('train.steps'), gin.query_parameter('train.batch_size'))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    steps_ref, steps, preset_ref, preset, train_steps, batch = proc.stdout.split()
    assert steps_ref == "%STEPS" and preset_ref == "%DIT_PRESET"  # the components read the macros
    assert steps == "77" and preset == "cpu" and train_steps == "100" and batch == "64"
