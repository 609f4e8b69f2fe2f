import os

import torch

from prism.training.checkpoints import list_checkpoints
from prism.training.distributed import EMA
from prism.training.loop import step_generator


def test_ema_warmup_and_decay_hand_computed():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.9)
    values = [1.0, 2.0, 3.0]
    expected = 0.0
    for n, v in enumerate(values):
        torch.nn.init.constant_(model.weight, v)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.1818..., 0.25
        expected = d * expected + (1 - d) * v
    assert abs(ema.shadow["weight"].item() - expected) < 1e-6
    # long after the warm-up, the nominal decay applies
    ema.updates = 10_000
    assert ema.current_decay() == 0.9


def test_step_generator_is_a_pure_function_of_its_key():
    a = torch.rand(4, generator=step_generator(0, 5, 1))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 5, 1)))
    for other in (step_generator(1, 5, 1), step_generator(0, 6, 1), step_generator(0, 5, 0), step_generator(0, 5, 1, domain=1)):
        assert not torch.equal(a, torch.rand(4, generator=other))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_00000002", True), ("step_00000010", True), ("step_00000011", False), (".tmp-step_00000012", True)]:
        os.makedirs(root / name)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_00000002", "step_00000010"]


def test_tied_weights_are_saved_once_and_restored(tmp_path):
    from prism.backbones.hf import HFBackbone
    from prism.checkpoint import load_weights, parameter_aliases, save_weights
    from prism.model import MDM

    cfg = dict(model_type="llama", vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = MDM(HFBackbone(config=cfg))
    assert model.backbone.model.lm_head.weight is model.backbone.model.model.embed_tokens.weight
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.backbone.model.lm_head.weight.add_(1.0)
    ema.update(model)
    weights = ema.weights(model.state_dict(), parameter_aliases(model))
    # the tied LM head takes the averaged embedding, not the raw one
    assert torch.equal(weights["backbone.model.lm_head.weight"], weights["backbone.model.model.embed_tokens.weight"])
    path = str(tmp_path / "w.safetensors")
    save_weights(weights, model, path)
    torch.manual_seed(1)
    other = MDM(HFBackbone(config=cfg))
    load_weights(other, path)
    assert torch.equal(other.backbone.model.lm_head.weight, weights["backbone.model.lm_head.weight"])
    assert other.backbone.model.lm_head.weight is other.backbone.model.model.embed_tokens.weight


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    from prism.backbones.dit import DiT
    from prism.checkpoint import load_weights, save_weights
    from prism.model import MDM

    small = MDM(DiT(vocab_size=11, mask_id=0, preset="test"))
    path = str(tmp_path / "small.safetensors")
    save_weights(small.state_dict(), small, path)
    bigger = MDM(DiT(vocab_size=11, mask_id=0, preset="test", hidden_size=64))
    import pytest

    with pytest.raises(ValueError, match=r"does not match the model.*shape mismatches: \['backbone.blocks.0.adaLN_modulation.bias: checkpoint \(192,\) vs model \(384,\)"):
        load_weights(bigger, path)
    with pytest.raises(FileNotFoundError, match="train one with"):
        load_weights(small, str(tmp_path / "missing.safetensors"))
