"""The ``Registry`` class, the project's registries and ``--user-dir`` plugin loading."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from typing import Any, Callable, Dict, List, Optional

import gin


def closest_names(name: str, known: List[str], n: int = 3) -> List[str]:
    """The known names most similar to ``name`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, known, n=n, cutoff=0.5)


class Registry:
    """A named collection of components of one kind (fairseq's ``registry.py`` pattern).

    ``kind`` is also the gin module: an entry ``name`` is the gin configurable ``<kind>.<name>``.
    ``base`` (optional) is a class every registered class must subclass; functions (builders) are
    accepted as they are, so a preset can be a plain function returning a component.
    """

    def __init__(self, kind: str, base: Optional[type] = None):
        self.kind = kind
        self.base = base
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(
                    f"Cannot register duplicate {self.kind} '{name}' ({_where(obj)}): already "
                    f"registered by {_where(self._entries[name])}. Pick another name."
                )
            if inspect.isclass(obj) and self.base is not None and not issubclass(obj, self.base):
                raise TypeError(
                    f"{self.kind} '{name}': {obj.__name__} must subclass {self.base.__module__}."
                    f"{self.base.__name__}"
                )
            configurable = gin.configurable(name, module=self.kind)(obj)
            self._entries[name] = configurable
            return configurable

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def unknown_message(self, name: str) -> str:
        close = closest_names(name, self.names())
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (
            f"Unknown {self.kind} '{name}'.{hint} Known {self.kind}: {', '.join(self.names()) or '(none)'}."
            " Plugins register more with --user-dir DIR or a gin `import`."
        )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


BACKBONES = Registry("backbones")
HEADS = Registry("heads")
LOSSES = Registry("losses")
SAMPLERS = Registry("samplers")
SCHEDULES = Registry("schedules")
UNMASK_RULES = Registry("unmask_rules")
REMASK_RULES = Registry("remask_rules")
DRAWS = Registry("draws")
NOISE = Registry("noise")
TASKS = Registry("tasks")
ADAPTERS = Registry("adapters")
REGISTRIES = {r.kind: r for r in (BACKBONES, HEADS, LOSSES, SAMPLERS, SCHEDULES, UNMASK_RULES, REMASK_RULES, DRAWS, NOISE, TASKS,
                                   ADAPTERS)}

# The project's component packages. Every module below them is imported, so a new component file
# (a task, a sampler, a loss) registers itself with no edit here, as fairseq imports every module of
# its component folders.
BUILTIN_PACKAGES = ("prism", "tasks")


def import_package_modules(package: str) -> List[str]:
    """Import ``package`` and every module below it; returns the module names, in import order."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
    return names


def load_builtin_components(packages=BUILTIN_PACKAGES) -> List[str]:
    """Register the built-in components: import every module of the component packages."""
    return [name for package in packages for name in import_package_modules(package)]


def import_user_dir(path: str) -> List[str]:
    """Import a plugin directory, as fairseq's ``--user-dir`` does; returns the imported module names.

    A directory with ``__init__.py`` is imported as a package (its parent goes on ``sys.path``, so a
    gin ``import <package>.<module>`` works too); otherwise every ``*.py`` in it is imported as a
    top-level module (the directory goes on ``sys.path``).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--user-dir {path!r} is not a directory")
    if os.path.exists(os.path.join(path, "__init__.py")):
        parent, package = os.path.split(path)
        if parent not in sys.path:
            sys.path.insert(0, parent)
        if package in sys.modules and not os.path.abspath(
            getattr(sys.modules[package], "__file__", "") or ""
        ).startswith(path):
            raise ImportError(
                f"--user-dir {path}: a different module named '{package}' is already imported; "
                "rename the plugin directory"
            )
        importlib.import_module(package)
        return [package]
    if path not in sys.path:
        sys.path.insert(0, path)
    names = []
    for file in sorted(os.listdir(path)):
        if file.endswith(".py") and not file.startswith("_"):
            name = file[:-3]
            loaded = sys.modules.get(name)
            if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") != os.path.join(path, file):
                raise ImportError(
                    f"--user-dir {path}: {file} is shadowed by the already imported module '{name}' "
                    f"({getattr(loaded, '__file__', 'built in')}); rename the file"
                )
            names.append(name)
            importlib.import_module(name)
    return names
