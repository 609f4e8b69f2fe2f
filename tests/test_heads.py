"""``heads.attention``: its head count is derived from the backbone's width when not given, and a
given count that cannot split the width is refused with the valid choices."""
import gin
import pytest
import torch

from prism import cli
from prism.backbones.dit import DiT
from prism.heads.quality import AttentionHead, attention_head_choices, default_attention_heads
from prism.model import MDM


def test_default_head_count_follows_the_width():
    # at most 12 heads of at least 32 channels: the DiT presets' own counts (small, tiny, cpu)
    assert [default_attention_heads(w) for w in (768, 512, 128)] == [12, 8, 4]
    assert default_attention_heads(96) == 3  # 12, 8, 6, 4 would give heads under 32 channels
    assert default_attention_heads(32) == default_attention_heads(16) == 1  # too narrow for two
    assert attention_head_choices(128) == [1, 2, 4, 8, 16, 32, 64]  # even head dimensions only
    head = AttentionHead(128, 64)
    assert head.n_heads == head.block.n_heads == 4 and head.rotary.inv_freq.numel() == 32 // 2
    with pytest.raises(ValueError, match="even width"):
        default_attention_heads(33)


def test_attention_head_on_the_sudoku_base_gin():
    """``models.mdm.head = @heads.attention`` on gin/sudoku/base.gin (the 128-wide ``cpu`` DiT, whose
    width the old default of 12 heads did not divide) builds and runs."""
    try:
        cli.parse_gin(["sudoku/base.gin"], ["models.mdm.head = @heads.attention"])
        model = MDM()
    finally:
        gin.clear_config()
    assert isinstance(model.head, AttentionHead) and model.backbone.hidden_size == 128
    assert model.head.n_heads == 4 == model.backbone.blocks[0].n_heads
    out = model(torch.randint(0, 11, (2, 89), generator=torch.Generator().manual_seed(0)))
    assert out.quality_logits.shape == (2, 89) and torch.all(out.quality_logits == 0)  # zero-initialised


@pytest.mark.parametrize("n_heads", [12, 3, 0, 128])
def test_a_head_count_that_does_not_split_the_width_is_refused(n_heads):
    # 12 and 3 do not divide 128; 0 is no head count; 128 heads would be 1 channel each (odd: no rotary)
    with pytest.raises(ValueError) as err:
        AttentionHead(128, 64, n_heads=n_heads)
    msg = str(err.value)
    assert f"n_heads = {n_heads}" in msg and "width 128" in msg and "[1, 2, 4, 8, 16, 32, 64]" in msg
    # through the model builder, as gin calls it
    with pytest.raises(ValueError, match="width 32"):
        MDM(DiT(11, 0, preset="test"), lambda **kw: AttentionHead(**kw, n_heads=3))


def test_a_valid_head_count_is_used():
    head = AttentionHead(128, 64, n_heads=8)
    assert head.n_heads == head.block.n_heads == 8 and head.rotary.inv_freq.numel() == 16 // 2
