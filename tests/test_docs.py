"""The front door: the README stays short, its Python example runs as written, and every relative link of
the README and docs/ names a file (and a heading) that exists."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

DOCS = [os.path.join(REPO, "README.md")] + [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(REPO, "docs"))
                                            for f in fs if f.endswith(".md")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_a_front_door():
    text = open(os.path.join(REPO, "README.md")).read()
    assert len(text.splitlines()) <= 200
    for part in ("## Install", "## Data", "## Quickstart", "## Tests", "## Reproducing the paper", "## Limits",
                 "## Citation", "python -m prism.data fetch"):
        assert part in text, part


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", open(doc).read(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(target)
    assert not bad, bad


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "sudoku")), reason="needs ../shared/data")
def test_the_readme_python_example_runs():
    block = re.search(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), flags=re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) <= 7
    proc = subprocess.run([sys.executable, "-c", block], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    value = float(re.search(r"tensor\(([0-9.]+)\)", proc.stdout).group(1))
    assert 0.0 <= value <= 1.0


def documented_commands():
    """(doc, command) for every shell command of the README and docs/ (continuation lines joined)."""
    out = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", open(doc).read(), flags=re.S):
            for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
                cmd = cmd.split(" #")[0].strip()
                if cmd.startswith("#"):
                    continue
                if re.search(r"\brun\.py|\bbenchmarks/|-m prism\.|\bprism (train|sample|eval)\b", cmd):
                    out.append((os.path.relpath(doc, REPO), cmd))
    return out


def test_documented_commands_name_real_things():
    """Every documented command names files, modules, gin configurations and bindings that exist and
    parse: a run.py command's gin files with its --bind bindings go through gin (every parameter named
    must be a parameter of its configurable)."""
    import importlib.util
    import shlex

    import gin

    from prism import cli

    bad = []
    commands = documented_commands()
    assert len(commands) > 30
    for doc, cmd in commands:
        try:
            words = shlex.split(cmd.replace("$(", "").replace("${", "{"))
        except ValueError as err:
            bad.append((doc, cmd, f"shell: {err}"))
            continue
        for w in words:
            if re.fullmatch(r"(benchmarks|accelerate_configs)/[\w./-]+\.(py|sh|yaml)", w) and not os.path.exists(os.path.join(REPO, w)):
                bad.append((doc, cmd, f"no file {w}"))
        for i, w in enumerate(words):
            if w == "-m" and i + 1 < len(words) and words[i + 1].startswith("prism"):
                if importlib.util.find_spec(words[i + 1]) is None:
                    bad.append((doc, cmd, f"no module {words[i + 1]}"))
        if "run.py" in words or re.search(r"\bprism (train|sample|eval)\b", cmd):
            start = words.index("run.py") + 1 if "run.py" in words else words.index("prism") + 1
            args = words[start + 1:]
            configs = [a for a in args if a.endswith(".gin") and not a.startswith("-")]
            binds = [args[i + 1] for i, a in enumerate(args) if a == "--bind" and i + 1 < len(args)]
            gin.clear_config()
            try:
                cli.load_builtin_components()
                for d in [args[i + 1] for i, a in enumerate(args) if a == "--user-dir"]:
                    pass  # plugin folders exist only in the tutorial's own test (tests/test_plugins.py)
                if "--user-dir" not in args:
                    cli.parse_gin(configs, binds)
            except SystemExit as err:
                bad.append((doc, cmd, str(err)[:300]))
            finally:
                gin.clear_config()
    assert not bad, "\n".join(f"{d}: {c}\n    {why}" for d, c, why in bad)


def test_the_prism_console_script_is_run_py():
    """setup.cfg's console script ``prism`` is ``prism.cli:console``, the same CLI as ``python run.py``."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name == "prism"}
    assert scripts == {"prism": "prism.cli:console"}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['prism', '--help']; "
                           "from prism.cli import console; console()"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "{train,sample,eval}" in proc.stdout
