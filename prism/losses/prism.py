"""``losses.prism``: PRISM fine-tuning, Algorithm 1 and Eq. (3) of Kim, Kim, Lee et al. (2025).

For a data sequence x:

1. t ~ U[eps, 1], z ~ q(z_t | x) (the MDM's masking process);
2. one forward pass on z gives the MDM loss on z and, detached, the posterior p_θ(· | z);
3. n_y times: choose k masked positions of z and fill them with tokens drawn from that posterior
   (temperature, nucleus p; ``prism.ops.categorical_draw``, drawn at the masked positions only),
   every other masked position stays masked: this is y;
4. one batched forward pass on the n_y sequences y gives the quality logits g(y);

    L = mean over filled (y, i) of BCE(1[y_i = x_i], g_i(y))  +  λ · L_MDM(z).

Proposition 1: the minimiser is g_i(y) = p(x_i = y_i | y with position i masked) (k = 1). With k > 1
the head cannot tell its k − 1 companion fills from data tokens, and the minimiser is the posterior
under the whole sampling process, P(x_i = y_i | y, i ∈ F) (enumerated in tests/test_prop1.py).

Two backbone passes per step in all (the MDM term and the draw of y share the pass on z; the pass on y
asks an MDM for the quality only, without SUBS log-probs); both run in
the one ``forward`` that ``prism.training.loop`` wraps for DDP. With ``source='frozen'`` y is drawn from a frozen
copy of the starting model instead (a third, gradient-free pass).
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F

from prism.metrics.calibration import expected_calibration_error
from prism.losses.base import Loss, LossOutput
from prism.losses.mdm import MDLMLoss, check_normalize, corrupt
from prism.masking import LOGLINEAR, NoiseSchedule
from prism.model import MDM
from prism.ops import categorical_draw, select_top
from registry import LOSSES

POSITIONS = ("random", "confident", "leftmost_confident")
SOURCES = ("model", "frozen")


def check_k(k: Union[int, str]) -> None:
    """Algorithm 1's k: a positive int, or 'uniform' (see ``fill_counts``)."""
    if not (k == "uniform" or (isinstance(k, int) and k >= 1)):
        raise ValueError(f"losses.prism.k must be a positive int or 'uniform'; got {k!r}")


def fill_counts(k: Union[int, str], masked: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B,) long: how many masked positions of each row to fill. An int k is the paper's fixed k;
    ``'uniform'`` draws k ~ U{1, ..., #masked} per row (0 for a row with no masks), so the head also
    sees sequences where most masked positions hold model guesses, as a sampler's late steps do."""
    check_k(k)
    if k != "uniform":
        return torch.full((masked.shape[0],), k, dtype=torch.long, device=masked.device)
    n = masked.sum(1).cpu()
    u = torch.rand(n.shape, generator=generator, dtype=torch.float64)
    return (1 + (u * n).floor().long()).minimum(n).to(masked.device)  # n = 0 gives 0


def choose_fill_positions(rule: str, k: Union[int, str], masked: torch.Tensor, token_log_probs: torch.Tensor,
                          generator: Optional[torch.Generator], window: Optional[int] = None) -> torch.Tensor:
    """(B, L) bool: the k masked positions of each row to fill (all of them if fewer are masked;
    ``k='uniform'``: a per-row count, see ``fill_counts``).

    ``random``: uniform among masked positions; ``confident``: the highest probability of the drawn
    token; ``leftmost_confident``: the most confident among the leftmost ``window`` masked positions
    (the LLaDA recipe: its semi-autoregressive sampler only ever fills the current block)."""
    if rule == "random":
        scores = torch.rand(masked.shape, generator=generator, dtype=torch.float64).to(masked.device)
        eligible = masked
    elif rule in ("confident", "leftmost_confident"):
        scores = token_log_probs
        eligible = masked
        if rule == "leftmost_confident":
            if not window:
                raise ValueError("positions='leftmost_confident' needs a window (e.g. the semi-AR block length)")
            eligible = masked & (masked.long().cumsum(1) <= window)
    else:
        raise ValueError(f"unknown positions rule {rule!r}; known: {', '.join(POSITIONS)}")
    counts = fill_counts(k, masked, generator)
    return select_top(scores, eligible, counts)


@LOSSES.register("prism")
class PRISMLoss(Loss):
    """PRISM loss (Algorithm 1, Eq. 3): BCE of the quality head on k self-filled positions + λ·MDLM.

    ``k``: positions filled per y (an int, or 'uniform': k ~ U{1..#masked} per sequence);
    ``n_y``: index sets (sequences y) per z; ``mdm_weight``: λ;
    ``temperature`` / ``top_p``: how y's tokens are drawn; ``positions``: 'random' | 'confident' |
    'leftmost_confident' (with ``window``); ``source``: 'model' (the current model, stop-gradient)
    or 'frozen' (a frozen copy of the model as loaded from ``experiment.init_checkpoint``);
    ``normalize`` / ``mask_window``: the MDM term's normalisation and masking window, as
    ``losses.mdlm`` (LLaDA recipe: 'sequence' and 512).
    Which parameters train is ``experiment.trainable`` (head only, head + backbone, ...).
    """

    def __init__(self, k: Union[int, str] = 4, n_y: int = 1, mdm_weight: float = 5.0, temperature: float = 1.0,
                 top_p: float = 1.0, positions: str = "random", window: Optional[int] = None,
                 source: str = "model", eps: float = 1e-3, antithetic: bool = True,
                 noise: Optional[NoiseSchedule] = None, normalize: str = "tokens", mask_window: Optional[int] = None):
        super().__init__()
        check_k(k)
        check_normalize(normalize)
        self.normalize, self.mask_window = normalize, mask_window
        if n_y < 1 or mdm_weight < 0:
            raise ValueError(f"need n_y >= 1, mdm_weight >= 0; got {n_y}, {mdm_weight}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions rule {positions!r}; known: {', '.join(POSITIONS)}")
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
        self.k, self.n_y, self.mdm_weight = k, n_y, mdm_weight
        self.temperature, self.top_p, self.positions, self.window = temperature, top_p, positions, window
        self.source, self.eps, self.antithetic = source, eps, antithetic
        self.noise = noise or LOGLINEAR
        self._frozen = []  # a list, so the frozen copy is neither a sub-module nor in checkpoints

    def attach(self, model) -> None:
        if getattr(model, "head", None) is None:
            raise ValueError("losses.prism needs a model with a quality head: models.mdm.head = @heads.linear")
        if self.source == "frozen":
            self._frozen = [copy.deepcopy(model).eval().requires_grad_(False)]

    def draw_y(self, log_probs, x, z, masked, generator):
        """Step 3 of Algorithm 1, n_y times: returns (y, filled, label) of shape (n_y·B, L), copy j in
        rows j·B … (j + 1)·B − 1. The n_y token draws read the same (B, L, V) log-probs, one after
        another, at the masked positions only (elsewhere the token of z): no (n_y·B, L, V) copy."""
        rep = lambda a: a.repeat(self.n_y, *([1] * (a.dim() - 1)))  # noqa: E731
        draws = [categorical_draw(log_probs, generator, self.temperature, self.top_p, positions=masked,
                                  fill=z).to(z.device) for _ in range(self.n_y)]
        token_lp = torch.cat([log_probs.gather(-1, d[..., None]).squeeze(-1) for d in draws])
        tokens, x, z, masked = torch.cat(draws), rep(x), rep(z), rep(masked)
        filled = choose_fill_positions(self.positions, self.k, masked, token_lp, generator, self.window)
        y = torch.where(filled, tokens, z)
        return y, filled, (tokens == x) & filled

    def forward(self, model, batch, generator) -> LossOutput:
        x, fixed, t, z, masked = corrupt(self, model.mask_id, batch, generator)
        attention_mask = batch.get("attention_mask")
        # pass 1 (on z): the MDM term; when the backbone is frozen it needs no graph
        backbone_trains = any(p.requires_grad for p in model.backbone.parameters())
        with torch.set_grad_enabled(backbone_trains and torch.is_grad_enabled()):
            out_z = model(z, attention_mask=attention_mask, t=t)
        mdm = MDLMLoss.nelbo(out_z.log_probs, x, masked, fixed, self.noise.weight(t), self.normalize)
        with torch.no_grad():
            if self.source == "frozen":
                frozen = self._frozen[0].to(z.device)
                log_probs = frozen(z, attention_mask=attention_mask, t=t).log_probs
            else:
                log_probs = out_z.log_probs.detach()
            y, filled, label = self.draw_y(log_probs, x, z, masked, generator)
        # pass 2 (on the n_y sequences y, batched): the quality head
        rep_mask = attention_mask.repeat(self.n_y, 1) if attention_mask is not None else None
        # an MDM skips the (n_y·B, L, V) SUBS log-probs this pass would throw away
        only_quality = {"log_probs": False} if isinstance(model, MDM) else {}
        out_y = model(y, attention_mask=rep_mask, t=t.repeat(self.n_y), **only_quality)
        logits = out_y.quality_logits[filled]
        target = label[filled].float()
        if logits.numel():
            bce = F.binary_cross_entropy_with_logits(logits.float(), target)
        else:  # nothing was masked anywhere in the batch: keep the graph, contribute nothing
            bce = out_y.quality_logits.sum() * 0.0
        loss = bce + (self.mdm_weight * mdm.loss if backbone_trains and self.mdm_weight else 0.0)
        with torch.no_grad():
            g = torch.sigmoid(logits.float())
            logs = {
                "bce": bce.detach(),
                **mdm.logs,
                "head_acc": ((g > 0.5) == target.bool()).float().mean() if g.numel() else torch.tensor(float("nan")),
                "fill_acc": target.mean() if g.numel() else torch.tensor(float("nan")),
                "quality_mean": g.mean() if g.numel() else torch.tensor(float("nan")),
                "head_ece": torch.tensor(expected_calibration_error(g, target) if g.numel() else float("nan")),
            }
        return LossOutput(loss, logs)
