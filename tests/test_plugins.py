"""The plugin tutorial of docs/plugins.md, written out of the page into a folder outside the repository
and run exactly as the page says (with --user-dir, and with a gin `import`)."""
import json
import os
import re

from conftest import REPO, run_py


def readme_files():
    text = open(os.path.join(REPO, "docs", "plugins.md")).read()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    assert {name for name, _ in blocks} >= {"my_plugins/__init__.py", "my_plugins/greedy.py",
                                             "my_plugins/bigru.py", "my_plugins/sudoku_bigru.gin"}
    return blocks


def write_plugin(root):
    for name, body in readme_files():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root / "my_plugins"


FAST = ["--bind", "STEPS = 8", "--bind", "tasks.sudoku.n_train_grids = 256", "--bind", "tasks.sudoku.cache_dir = None",
        "--bind", "train.num_threads = 1", "--bind", "train.steps = 6"]


def check_run(out):
    operative = open(os.path.join(out, "eval_operative_config.gin")).read()
    # gin writes the shortest unambiguous selector
    assert "mdm.backbone = @backbones.bigru()" in operative and "bigru.hidden_size = 64" in operative
    assert "experiment.sampler = @samplers.greedy_confidence()" in operative
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["n"] == 20 and metrics["givens_kept"] == 1.0
    # greedy_confidence unmasks ceil(m / steps_left) per step: exactly 8 forward passes for 51 blanks
    assert metrics["nfe"] == 8


def test_plugin_with_user_dir(tmp_path):
    plugin = write_plugin(tmp_path)
    out = str(tmp_path / "run")
    gin_file = str(plugin / "sudoku_bigru.gin")
    run_py(["train", gin_file, "--user-dir", str(plugin), "--output-dir", out, *FAST], cwd=str(tmp_path))
    run_py(["eval", gin_file, "--user-dir", str(plugin), "--output-dir", out, *FAST], cwd=str(tmp_path))
    check_run(out)


def test_plugin_with_gin_import(tmp_path):
    plugin = write_plugin(tmp_path)
    gin_file = plugin / "with_import.gin"
    gin_file.write_text("import my_plugins\n" + (plugin / "sudoku_bigru.gin").read_text())
    out = str(tmp_path / "run")
    env = {"PYTHONPATH": str(tmp_path)}
    run_py(["train", str(gin_file), "--output-dir", out, *FAST], cwd=str(tmp_path), env=env)
    run_py(["eval", str(gin_file), "--output-dir", out, *FAST], cwd=str(tmp_path), env=env)
    check_run(out)
