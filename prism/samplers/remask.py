"""Remasking rules: which clean positions are masked again. A rule scores positions (highest first);
the loop takes each row's top-n among the candidates (clean, non-fixed, inside the window).

    remask_rules.random          uniform (ReMDM, DFM)
    remask_rules.low_confidence  lowest probability at the time the token was unmasked (ReMDM-conf's proxy)
    remask_rules.prism           lowest PRISM quality g_i from the same forward pass (Algorithms 2-4)
    remask_rules.token_critic    lowest Token-Critic score on x̂ (one extra critic pass)
    remask_rules.p2_self         lowest probability the model gives the present token now (P2-self)
"""
from __future__ import annotations

import torch

from registry import REMASK_RULES


class RemaskRule:
    """``scores(model, state, x_hat, generator)`` → (B, L) float; higher remasks first. ``state`` is
    the loop's ``SamplerState`` (before the step); ``x_hat`` the state after this step's unmasking.
    ``extra_passes``: network passes a call costs (counted in NFE)."""

    extra_passes = 0

    def scores(self, model, state, x_hat, generator) -> torch.Tensor:
        raise NotImplementedError


@REMASK_RULES.register("random")
class RandomRemask(RemaskRule):
    def scores(self, model, state, x_hat, generator):
        return torch.rand(x_hat.shape, generator=generator, dtype=torch.float64).to(x_hat.device)


@REMASK_RULES.register("low_confidence")
class LowConfidenceRemask(RemaskRule):
    """−p(token) at the step it was unmasked: the stale confidence ReMDM-conf remasks by."""

    def scores(self, model, state, x_hat, generator):
        return -state.confidence.nan_to_num(1.0)


@REMASK_RULES.register("prism")
class PRISMRemask(RemaskRule):
    """−g_i: the PRISM head's quality of each clean token given the rest of the current sequence,
    from the same forward pass that gives the unmasking posterior (no extra cost)."""

    def scores(self, model, state, x_hat, generator):
        if state.quality is None:
            raise ValueError("remask_rules.prism needs a model with a quality head (models.mdm.head)")
        return -state.quality.double()


@REMASK_RULES.register("token_critic")
class TokenCriticRemask(RemaskRule):
    """−critic_i(x̂): the Token-Critic reads the sequence after this step's unmasking (one pass)."""

    extra_passes = 1

    def scores(self, model, state, x_hat, generator):
        return -model.critic_logits(x_hat, getattr(state, "attention_mask", None)).double()


@REMASK_RULES.register("p2_self")
class P2SelfRemask(RemaskRule):
    """−log p_θ(z_i | z): the model's own current probability of each present token (Peng et al.
    2025, P2 with the model as its own planner), from the same forward pass."""

    def scores(self, model, state, x_hat, generator):
        if state.token_log_probs is None:
            raise ValueError("remask_rules.p2_self needs MDMOutput.token_log_probs")
        return -state.token_log_probs.double()
