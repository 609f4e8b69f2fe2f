import os
import gin
import pytest
import torch

from registry import BACKBONES, Registry
from prism.backbones.base import Backbone


def test_register_build_and_list():
    reg = Registry("widgets_a")

    @reg.register("one")
    class One:
        def __init__(self, x=1):
            self.x = x

    assert reg.names() == ["one"]
    assert reg.build("one", x=3).x == 3
    # also a gin configurable under its kind
    gin.parse_config(["widgets_a.one.x = 7"])
    try:
        assert reg.build("one").x == 7
    finally:
        gin.clear_config()


def test_duplicate_name_is_refused():
    reg = Registry("widgets_b")

    @reg.register("dup")
    def first():
        return 1

    with pytest.raises(ValueError, match="duplicate widgets_b 'dup'"):
        @reg.register("dup")
        def second():
            return 2


def test_base_class_is_checked():
    reg = Registry("widgets_c", base=torch.nn.Module)
    with pytest.raises(TypeError, match="must subclass torch.nn.modules.module.Module"):
        @reg.register("bad")
        class NotAModule:
            pass


def test_unknown_name_lists_known_names_and_closest():
    with pytest.raises(KeyError) as err:
        BACKBONES.build("ditt")
    msg = str(err.value)
    assert "Did you mean 'dit'?" in msg
    assert "dit, hf" in msg


def test_builtin_backbones_subclass_the_contract():
    for name in BACKBONES.names():
        assert issubclass(BACKBONES.get(name), Backbone)


def test_user_dir_of_plain_modules_and_name_clash(tmp_path):
    from registry import SAMPLERS, import_user_dir

    (tmp_path / "plain_plugin_mod.py").write_text(
        "from registry import SAMPLERS\n@SAMPLERS.register('plain_plugin_sampler')\ndef f(steps=3):\n    return steps\n")
    assert import_user_dir(str(tmp_path)) == ["plain_plugin_mod"]
    assert SAMPLERS.build("plain_plugin_sampler") == 3
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "tasks.py").write_text("raise RuntimeError('never imported')\n")
    with pytest.raises(ImportError, match="tasks.py is shadowed by the already imported module 'tasks'"):
        import_user_dir(str(clash))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        import_user_dir(str(tmp_path / "nope"))


def test_every_module_of_the_component_packages_is_imported():
    """load_builtin_components finds the built-in components by walking prism/ and tasks/: every
    module file on disk is imported (a new task file needs no registry edit)."""
    import sys

    from registry import load_builtin_components

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    on_disk = set()
    for package in ("prism", "tasks"):
        for folder, _, files in os.walk(os.path.join(repo, package)):
            for f in files:
                if f.endswith(".py") and "__pycache__" not in folder:
                    rel = os.path.relpath(os.path.join(folder, f), repo)[:-3].replace(os.sep, ".")
                    on_disk.add(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    imported = set(load_builtin_components())
    assert on_disk == imported
    assert on_disk <= set(sys.modules)


def test_a_new_component_file_registers_itself_without_a_registry_edit(tmp_path, monkeypatch):
    import sys

    from registry import TASKS
    from registry.core import import_package_modules

    pkg = tmp_path / "my_tasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "countdown.py").write_text(
        "from registry import TASKS\n\n\n@TASKS.register('countdown_test_only')\ndef countdown(n: int = 3):\n    return list(range(n, 0, -1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_package_modules("my_tasks") == ["my_tasks", "my_tasks.countdown"]
        assert "countdown_test_only" in TASKS and TASKS.build("countdown_test_only") == [3, 2, 1]
    finally:
        TASKS._entries.pop("countdown_test_only", None)
        for name in ("my_tasks", "my_tasks.countdown"):
            sys.modules.pop(name, None)
