"""prism/mdlm_weights.py: MDLM's released layouts (Hugging Face safetensors, Lightning .ckpt with its EMA
list) into PRISM's DiT MDM and back, MDLM's parameter order, and MDLM's time conditioning."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from prism.backbones.dit import DiT
from prism.checkpoint import load_weights
from prism.mdlm_weights import (MDLM_KEY_MAP, ROTARY_KEY, convert, lightning_state, load_mdlm_lightning, main,
                                mdlm_hf_state, mdlm_layout, mdlm_parameter_names, save_mdlm_hf)
from prism.model import MDM

SIZES = dict(vocab_size=37, mask_id=36, hidden_size=32, n_blocks=2, n_heads=2, cond_dim=16)
IDS = torch.tensor([[36, 3, 5, 36, 7, 1, 36, 2, 9, 4, 36, 30], [1, 36, 36, 8, 0, 2, 3, 36, 11, 12, 36, 5]])


def model(seed: int, **overrides) -> MDM:
    """A reduced-width DiT MDM with every weight drawn from ``seed`` (adaLN-zero would make models alike)."""
    torch.manual_seed(seed)
    m = MDM(DiT(**{**SIZES, **overrides}))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def logits(m: MDM) -> torch.Tensor:
    with torch.no_grad():
        return m(IDS).log_probs


def test_mdlm_order_is_spelled_out_for_one_block():
    # MDLM DIT.__init__ registers vocab_embed, sigma_map, rotary_emb (buffer only), blocks, output_layer;
    # DDiTBlock: norm1, attn_qkv, attn_out, dropout1, norm2, mlp (Linear, GELU, Linear), dropout2, adaLN_modulation.
    assert mdlm_parameter_names(1) == [
        "backbone.vocab_embed.embedding",
        "backbone.sigma_map.mlp.0.weight", "backbone.sigma_map.mlp.0.bias",
        "backbone.sigma_map.mlp.2.weight", "backbone.sigma_map.mlp.2.bias",
        "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn_qkv.weight", "backbone.blocks.0.attn_out.weight",
        "backbone.blocks.0.norm2.weight", "backbone.blocks.0.mlp.0.weight", "backbone.blocks.0.mlp.0.bias",
        "backbone.blocks.0.mlp.2.weight", "backbone.blocks.0.mlp.2.bias",
        "backbone.blocks.0.adaLN_modulation.weight", "backbone.blocks.0.adaLN_modulation.bias",
        "backbone.output_layer.norm_final.weight", "backbone.output_layer.linear.weight",
        "backbone.output_layer.linear.bias", "backbone.output_layer.adaLN_modulation.weight",
        "backbone.output_layer.adaLN_modulation.bias",
    ]
    assert len(mdlm_parameter_names(12)) == 130


def test_small_on_meta_maps_every_name_in_mdlm_order_with_mdlm_shapes():
    with torch.device("meta"):
        small = MDM(DiT(vocab_size=50258, mask_id=50257, preset="small"))
    ours = [(n, tuple(p.shape)) for n, p in small.named_parameters()]
    layout = mdlm_layout(12)  # MDLM-OWT: vocab 50258, width 768, cond 128
    hf = mdlm_hf_state(small, rotary=False)
    # PRISM's parameter order is MDLM's, and every name maps one to one, with MDLM's shapes
    assert [(n, tuple(t.shape)) for n, t in hf.items()] == list(layout.items())
    assert len(ours) == len(layout) == 130
    assert sum(math.prod(s) for s in layout.values()) == sum(math.prod(s) for _, s in ours) == 169_627_218
    # and the key map brings every MDLM name back to PRISM's
    from prism.checkpoint import compile_key_map, map_key

    rules = compile_key_map(MDLM_KEY_MAP)
    assert [map_key(n, rules) for n in layout] == [n for n, _ in ours]
    assert map_key(ROTARY_KEY, rules) is None and map_key("noise.sigma_max", rules) is None


def test_hf_layout_loads_through_the_key_map_with_identical_logits(tmp_path):
    source, target = model(0), model(1)
    assert not torch.equal(logits(source), logits(target))
    path = str(tmp_path / "model.safetensors")
    keys = save_mdlm_hf(source, path)
    assert keys == list(mdlm_layout(2, 37, 32, 16)) + [ROTARY_KEY]
    assert torch.equal(load_file(path)[ROTARY_KEY], source.backbone.rotary.inv_freq)
    with pytest.raises(ValueError, match=r"missing: \['backbone.vocab_embed'\]; unexpected: "
                                         r"\['backbone.rotary_emb.inv_freq', 'backbone.vocab_embed.embedding'\]"):
        load_weights(target, path)
    load_weights(target, str(tmp_path), key_map=MDLM_KEY_MAP)  # the directory, as downloaded
    assert torch.equal(logits(target), logits(source))


def test_hf_layout_missing_and_misnamed_keys_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in mdlm_hf_state(model(0)).items()}
    gone = dict(state)
    del gone["backbone.blocks.1.norm2.weight"]
    save_file(gone, str(tmp_path / "gone.safetensors"))
    target = model(1)
    before = logits(target)
    with pytest.raises(ValueError, match=r"missing: \['backbone.blocks.1.norm2.weight'\]; unexpected: \[\]"):
        load_weights(target, str(tmp_path / "gone.safetensors"), key_map=MDLM_KEY_MAP)
    renamed = {k.replace("blocks.0.attn_out", "blocks.0.attn_o"): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ValueError, match=r"missing: \['backbone.blocks.0.attn_out.weight'\]; "
                                         r"unexpected: \['backbone.blocks.0.attn_o.weight'\]"):
        load_weights(target, str(tmp_path / "renamed.safetensors"), key_map=MDLM_KEY_MAP)
    assert torch.equal(logits(target), before)  # untouched


def lightning_ckpt(raw: MDM, ema: MDM, *, shadow=None, extra_state=None) -> dict:
    """A Lightning checkpoint as MDLM's training writes it: state_dict from ``raw`` (with the rotary
    buffer), ema.shadow_params from ``ema`` in MDLM's positional order."""
    state = {k: v.clone() for k, v in mdlm_hf_state(raw).items()}
    state.update(extra_state or {})
    ema_state = mdlm_hf_state(ema, rotary=False)
    names = mdlm_parameter_names(len(raw.backbone.blocks))
    return {
        "state_dict": state,
        "ema": {"decay": 0.9999, "num_updates": 7,
                "shadow_params": [ema_state[n].clone() for n in names] if shadow is None else shadow},
        "hyper_parameters": {"config": {"model": {"hidden_size": 32}, "time_conditioning": False}},
        "global_step": 7,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
    }


def test_lightning_ckpt_gives_the_ema_or_the_state_dict_weights(tmp_path):
    raw, ema = model(0), model(2)
    path = str(tmp_path / "last.ckpt")
    torch.save(lightning_ckpt(raw, ema, extra_state={"noise.sigma_max": torch.tensor(1.0)}), path)
    target = model(1)
    dropped = load_mdlm_lightning(target, path)  # use_ema=True by default, as MDLM samples
    assert dropped == ["noise.sigma_max"]
    assert torch.equal(logits(target), logits(ema)) and not torch.equal(logits(ema), logits(raw))
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), ema.parameters()))
    load_mdlm_lightning(target, path, use_ema=False)
    assert torch.equal(logits(target), logits(raw))
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), raw.parameters()))
    # the converter writes PRISM's layout, loaded with no key map (into a folder it makes: runs/ of a fresh clone)
    out = str(tmp_path / "runs" / "mdlm.safetensors")
    main(["convert", path, out])
    assert sorted(load_file(out)) == sorted(n for n, _ in target.named_parameters())
    load_weights(target, out)
    assert torch.equal(logits(target), logits(ema))
    main(["convert", path, out, "--no-ema", "--dtype", "bfloat16"])
    assert {v.dtype for v in load_file(out).values()} == {torch.bfloat16}
    # the Hugging Face layout converts too
    save_mdlm_hf(raw, str(tmp_path / "model.safetensors"))
    info = convert(str(tmp_path / "model.safetensors"), out)
    assert info["source"] == "huggingface"
    load_weights(target, out)
    assert torch.equal(logits(target), logits(raw))


def test_lightning_errors_name_what_is_wrong(tmp_path):
    raw, ema = model(0), model(2)
    ckpt = lightning_ckpt(raw, ema)
    shadow = ckpt["ema"]["shadow_params"]
    with pytest.raises(ValueError, match=r"ema.shadow_params has 29 tensors, expected 30 .*found 29"):
        lightning_state({**ckpt, "ema": {"shadow_params": shadow[:-1]}})
    swapped = [shadow[0], shadow[2], shadow[1], *shadow[3:]]  # sigma_map weight and bias exchanged
    with pytest.raises(ValueError, match=r"shadow_params\[1\] has shape \(16,\), but position 1 of MDLM's order is "
                                         r"backbone.sigma_map.mlp.0.weight with shape \(16, 256\)"):
        lightning_state({**ckpt, "ema": {"shadow_params": swapped}})
    with pytest.raises(ValueError, match="no ema.shadow_params.*use_ema=False"):
        lightning_state({"state_dict": ckpt["state_dict"]})
    # a missing state_dict key is named, in both modes; the model is untouched
    without = {k: v for k, v in ckpt["state_dict"].items() if k != "backbone.blocks.1.mlp.2.bias"}
    path = str(tmp_path / "gone.ckpt")
    torch.save({**ckpt, "state_dict": without}, path)
    target = model(1)
    before = logits(target)
    with pytest.raises(ValueError, match=r"lacks MDLM parameters \['backbone.blocks.1.mlp.2.bias'\]"):
        load_mdlm_lightning(target, path)
    with pytest.raises(ValueError, match=r"missing: \['backbone.blocks.1.mlp.2.bias'\]; unexpected: \[\]"):
        load_mdlm_lightning(target, path, use_ema=False)
    # a misnamed key: both names reported
    renamed = {k.replace("output_layer.linear", "output_layer.proj"): v for k, v in ckpt["state_dict"].items()}
    torch.save({**ckpt, "state_dict": renamed}, path)
    with pytest.raises(ValueError, match=r"missing: \['backbone.output_layer.linear.bias', "
                                         r"'backbone.output_layer.linear.weight'\]; unexpected: "
                                         r"\['backbone.output_layer.proj.bias', 'backbone.output_layer.proj.weight'\]"):
        load_mdlm_lightning(target, path, use_ema=False)
    # a model of another size: shapes reported
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"shape mismatches: \['backbone.blocks.0.adaLN_modulation.weight"):
        load_mdlm_lightning(model(1, cond_dim=8), path)
    assert torch.equal(logits(target), before)
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        load_mdlm_lightning(target, path)


FAKE_OMEGACONF = """
import os
class DictConfig(dict):
    # MDLM's real .ckpt pickles omegaconf DictConfigs in hyper_parameters; this stand-in pickles the same
    # way (a class with state) and leaves a mark if any of its code runs when the file is read
    def __reduce__(self):
        return (DictConfig, (), {"_content": dict(self), "_metadata": {"flags": {"readonly": True}}})
    def __setstate__(self, state):
        open(os.environ["OMEGACONF_MARK"], "w").write("ran")
"""


def test_a_ckpt_with_omegaconf_objects_converts_without_omegaconf(tmp_path, monkeypatch):
    """MDLM's real checkpoints pickle an omegaconf DictConfig (and a tokenizer) in hyper_parameters:
    weights_only=True refuses them, a full unpickle needs omegaconf installed and runs the file's code.
    The reader turns them into Opaque records instead: the weights load, omegaconf is never imported,
    none of its code runs."""
    import sys

    from prism.mdlm_weights import Opaque, read_lightning

    pkg = tmp_path / "fake" / "omegaconf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_OMEGACONF)
    mark = tmp_path / "ran.txt"
    monkeypatch.setenv("OMEGACONF_MARK", str(mark))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    import omegaconf

    raw, ema = model(0), model(2)
    path = str(tmp_path / "last.ckpt")
    config = omegaconf.DictConfig(model={"hidden_size": 32}, backbone="dit")
    torch.save({**lightning_ckpt(raw, ema), "hyper_parameters": {"config": config}}, path)
    monkeypatch.delitem(sys.modules, "omegaconf")
    sys.path.remove(str(tmp_path / "fake"))
    with pytest.raises(ModuleNotFoundError):
        import omegaconf  # noqa: F401,F811 - gone, as on a machine without it

    ckpt = read_lightning(path)
    hp = ckpt["hyper_parameters"]["config"]
    assert isinstance(hp, Opaque) and hp.state["_content"] == {"model": {"hidden_size": 32}, "backbone": "dit"}
    target = model(1)
    load_mdlm_lightning(target, path)
    assert torch.equal(logits(target), logits(ema))
    main(["convert", path, str(tmp_path / "mdlm.safetensors")])
    assert not mark.exists() and "omegaconf" not in sys.modules


def test_gin_routes_for_the_hf_layout(tmp_path, tiny_gin):
    import gin

    from prism import cli
    from prism.experiment import build_experiment

    def build(*binds):
        try:
            cli.parse_gin([tiny_gin], ["tasks.sudoku.n_train_grids = 8", "backbones.dit.position_groups = None",
                                       "backbones.dit.group_attention = False", *binds])
            return build_experiment().model
        finally:
            gin.clear_config()

    source = build()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.3)
    path = str(tmp_path / "model.safetensors")
    save_mdlm_hf(source, path)
    for key_map in ("@mdlm_key_map()", "%MDLM_KEY_MAP"):
        loaded = build(f"experiment.init_checkpoint = '{path}'", f"experiment.key_map = {key_map}")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


def sinusoid(sigma: torch.Tensor, size: int = 256) -> torch.Tensor:
    """MDLM's TimestepEmbedder.timestep_embedding (max_period 10000), written out."""
    half = size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_time_conditioning_feeds_mdlm_sigma_or_zeros():
    t = torch.tensor([0.0, 0.3, 0.999])
    ids = IDS[:1].expand(3, -1)
    for conditioned in (False, True):
        m = model(0, time_conditioning=conditioned).backbone
        with torch.no_grad():
            cond = m(ids, t=t).cond
            # MDLM: sigma = LogLinearNoise(eps=1e-3).total_noise(t) = -log(1 - (1 - eps) t); zeros when unconditioned
            sigma = -torch.log(1 - (1 - 1e-3) * t) if conditioned else torch.zeros(3)
            mlp = m.sigma_map.mlp
            want = torch.nn.functional.silu(mlp[2](torch.nn.functional.silu(mlp[0](sinusoid(sigma)))))
        torch.testing.assert_close(cond, want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(cond[0], cond[1]) != conditioned


def documented_key_map_block(doc: str) -> str:
    """The gin block of the docs that loads MDLM's released model.safetensors."""
    import re

    blocks = re.findall(r"```gin\n(.*?)```", open(doc).read(), flags=re.S)
    return next(b for b in blocks if "MDLM's released DiT" in b)


def test_the_documented_key_map_loads_an_mdlm_file_strictly(tmp_path):
    """The docs' example (experiment.init_checkpoint + key_map) on a file in MDLM's Hugging Face layout,
    rotary buffer included: a strict load with the same logits, as %MDLM_KEY_MAP gives."""
    import gin

    from prism.checkpoint import compile_key_map
    from prism.mdlm_weights import MDLM_KEY_MAP

    import conftest

    raw = model(0)
    path = tmp_path / "model.safetensors"
    save_mdlm_hf(raw, str(path))
    assert "backbone.rotary_emb.inv_freq" in load_file(str(path))
    block = documented_key_map_block(os.path.join(conftest.REPO, "docs", "configuration.md"))
    binds = [line.split("#")[0] for line in block.splitlines() if line.startswith(("experiment.key_map", " "))]
    gin.clear_config()
    try:
        gin.parse_config("\n".join(binds))
        key_map = gin.query_parameter("experiment.key_map")
    finally:
        gin.clear_config()
    assert [tuple(x) for x in key_map] == [tuple(x) for x in MDLM_KEY_MAP]
    target = model(1)
    load_weights(target, str(path), key_map=compile_key_map(key_map))
    assert torch.equal(logits(target), logits(raw))
