"""Reading gin configurations: files (paths, or relative to the repository's ``gin/`` folder) and
``--bind`` bindings, with errors that name what is wrong ('did you mean', the known components and
parameters). ``parse_gin`` raises ``GinConfigError``; ``run.py`` turns it into an exit message."""
from __future__ import annotations

import inspect
import logging
import os
import re
from typing import List, Sequence

import gin

from prism.paths import REPO_ROOT
from registry import closest_names


class GinConfigError(ValueError):
    """A gin file or binding that cannot be read, with what to do about it."""


def _known_gin_names() -> List[str]:
    names = []
    for selector, _ in gin.config._REGISTRY.items():
        if not selector.startswith("gin."):
            names.append(selector)
    return names


def explain_gin_error(err: Exception) -> str:
    """Add 'did you mean' to gin's error for an unknown configurable or parameter."""
    msg = str(err)
    m = re.search(r"No configurable matching (?:reference )?'@?([\w.]+?)(?:\(\))?'", msg)
    if m:
        name = m.group(1)
        known = _known_gin_names()
        close = closest_names(name, known) or closest_names(name.split(".")[-1], [k.split(".")[-1] for k in known])
        kind = name.split(".")[0] if "." in name else None
        same_kind = sorted(k for k in known if kind and k.startswith(kind + "."))
        hint = f"\nDid you mean '{close[0]}'?" if close else ""
        listing = f"\nKnown {kind}: {', '.join(same_kind)}" if same_kind else ""
        return f"{msg}{hint}{listing}\n(Plugins add components with --user-dir DIR or a gin `import`.)"
    m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", msg)
    if m:
        selector, param = m.groups()
        try:
            fn = gin.config._REGISTRY.get_match(selector).wrapped
            target = fn.__init__ if inspect.isclass(fn) else fn
            params = [n for n in inspect.signature(target).parameters if n not in ("self", "args", "kwargs")]
        except Exception:
            params = []
        close = closest_names(param, params)
        hint = f"\nDid you mean '{selector}.{close[0]}'?" if close else ""
        return f"{msg}{hint}\nParameters of {selector}: {', '.join(params)}"
    return msg


def resolve_config(path: str) -> str:
    for candidate in (path, os.path.join(REPO_ROOT, path), os.path.join(REPO_ROOT, "gin", path)):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"gin file {path!r} not found (looked in ., {REPO_ROOT}, {REPO_ROOT}/gin)")


class _QuietSearchPaths(logging.Filter):
    """gin logs every search-path miss of an ``include`` at ERROR level, even when a later path
    succeeds; a real miss still fails with an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def check_bindings(bindings: List[str]) -> None:
    """Parse each ``--bind`` alone before anything else, so a syntax error names the binding (gin's
    own parser stops deep inside itself with only a line number)."""
    from gin import config_parser

    for binding in bindings:
        try:
            for _ in config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)):
                pass
        except Exception as err:  # SyntaxError, tokenize.TokenError (an unclosed bracket), ...
            raise GinConfigError(f"--bind {binding!r} is not a valid gin binding ({type(err).__name__}: {err}). "
                             "A binding looks like: --bind \"train.steps = 3\" or --bind \"experiment.sampler = "
                             "@samplers.prism()\"; strings need quotes: --bind \"evaluate.tag = 'a'\"") from None


def parse_gin(configs: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parse gin ``configs`` then ``bindings`` into the global gin config (not finalized)."""
    check_bindings(list(bindings))
    logging.getLogger().addFilter(_QuietSearchPaths())
    for path in (os.path.join(REPO_ROOT, "gin"), REPO_ROOT):
        if path not in gin.config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(path)
    files = [resolve_config(c) for c in configs]
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    except (ValueError, ImportError, OSError) as err:
        raise GinConfigError(f"gin config error: {explain_gin_error(err)}") from None
