"""Fairseq-style registries, each entry also a gin configurable under its kind.

    from registry import BACKBONES
    @BACKBONES.register("dit")
    class DiT(Backbone): ...

makes ``backbones.dit`` usable from gin (``@backbones.dit()``, ``backbones.dit.n_blocks = 4``) and from
Python (``BACKBONES.build("dit", n_blocks=4)``).
"""
from registry.core import (  # noqa: F401
    ADAPTERS,
    BACKBONES,
    DRAWS,
    HEADS,
    LOSSES,
    NOISE,
    REGISTRIES,
    SAMPLERS,
    SCHEDULES,
    TASKS,
    REMASK_RULES,
    UNMASK_RULES,
    Registry,
    closest_names,
    import_user_dir,
    load_builtin_components,
)
