"""Samplers: one loop (``loop.py``) built from schedules, rules and draws."""
from prism.samplers.loop import SampleOutput, Sampler, mdlm_sampler  # noqa: F401
from prism.samplers import rules, schedules  # noqa: F401
