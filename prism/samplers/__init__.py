"""Samplers: one loop (``loop.py``) built from schedules, unmasking rules, remasking rules and draws;
each family in its own file (``remdm.py``, ``dfm.py``, ``prism.py``, ``critic.py``, ``semi_ar.py``)."""
from prism.samplers.loop import SampleOutput, Sampler, SamplerState, mdlm_sampler  # noqa: F401
from prism.samplers import critic, dfm, prism, remask, remdm, rules, schedules, semi_ar  # noqa: F401
