"""backbones.llada: numerics against transformers' Llama, padding, the released checkpoint layout, the
8B size, gradient checkpointing and use as an MDM backbone. CPU, tiny, seeded."""
import json
import os

import pytest
import torch

import prism.backbones.llada as llada
from prism.backbones.hf import bidirectional_mask
from prism.backbones.llada import LLaDABackbone, parameter_count
from prism.backbones.llada_files import save_released_layout

V = 96  # tiny vocabulary; mask id 95


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("config", dict(vocab_size=V))
    return LLaDABackbone(preset="tiny", **kw).eval()


def tokens(B, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V - 1, (B, L), generator=g)


def positions_of(keep):
    return (keep.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------ 1. against transformers' Llama
def llama_twin(bb):
    """A LlamaForCausalLM of the same sizes holding bb's weights (key map written out here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = bb.config
    cfg = LlamaConfig(vocab_size=c["embedding_size"], hidden_size=c["d_model"], intermediate_size=c["mlp_hidden_size"],
                      num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                      num_key_value_heads=c["n_kv_heads"], max_position_embeddings=c["max_sequence_length"],
                      rms_norm_eps=c["rms_norm_eps"], attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]})
    cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(cfg).eval()
    block_map = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                 "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                 "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    mapped = {}
    for key, value in bb.state_dict().items():
        name = key[len("model.transformer."):]
        if name.startswith("blocks."):
            _, i, part, _w = name.split(".")
            mapped[f"model.layers.{i}.{block_map[part]}.weight"] = value
        else:
            mapped[{"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
                    "ff_out.weight": "lm_head.weight"}[name]] = value
    assert set(mapped) == set(llama.state_dict())  # every Llama weight comes from bb, and nothing else
    llama.load_state_dict(mapped, strict=True)
    return llama


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_bidirectional_llama(attn):
    bb = tiny(attn_implementation=attn)
    llama = llama_twin(bb)
    x = tokens(4, 12)
    keep = torch.ones(4, 12, dtype=torch.bool)
    keep[1, :4] = False  # left padding
    keep[2, 9:] = False  # right padding
    keep[3, 3:6] = False  # a hole inside (packed rows)
    with torch.no_grad():
        for mask in (None, keep):
            m = torch.ones_like(keep) if mask is None else mask
            ref = llama(input_ids=x, attention_mask=bidirectional_mask(m, torch.float32), position_ids=positions_of(m),
                        output_hidden_states=True, use_cache=False)
            out = bb(x, attention_mask=mask)
            assert out.hidden_states.shape == (4, 12, 64) and out.logits.shape == (4, 12, V)
            assert torch.allclose(out.hidden_states[m], ref.hidden_states[-1][m], atol=1e-5), attn
            assert torch.allclose(out.logits[m], ref.logits[m], atol=1e-5), attn
    # and it really is bidirectional: the first position sees a change at the last one
    y = x.clone(); y[0, -1] = (x[0, -1] + 1) % (V - 1)
    with torch.no_grad():
        assert not torch.allclose(bb(x).logits[0, 0], bb(y).logits[0, 0], atol=1e-6)


# ------------------------------------------------------------------------------------- 2. padding
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_gives_the_unpadded_logits(attn):
    bb = tiny(attn_implementation=attn)
    lengths = [10, 6, 3]
    seqs = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    L, pad = max(lengths), 0
    with torch.no_grad():
        alone = [bb(s[None]).logits[0] for s in seqs]
        for side in ("left", "right", "inside"):
            x = torch.full((3, L), pad)
            keep = torch.zeros(3, L, dtype=torch.bool)
            for i, s in enumerate(seqs):
                if side == "inside":  # real tokens with padding holes between them: positions skip the holes
                    where = torch.linspace(0, L - 1, len(s)).round().long()
                    x[i, where], keep[i, where] = s, True
                    continue
                sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
                x[i, sl], keep[i, sl] = s, True
            # garbage in the padding must not matter either
            x = torch.where(keep, x, torch.randint(0, V, x.shape, generator=torch.Generator().manual_seed(5)))
            logits = bb(x, attention_mask=keep).logits
            for i in range(3):
                assert torch.allclose(logits[i][keep[i]], alone[i], atol=1e-5), (side, i)
        # an all-True mask takes the fast path and changes nothing
        full = torch.stack([seqs[0]])
        assert torch.allclose(bb(full, attention_mask=torch.ones_like(full, dtype=torch.bool)).logits[0], alone[0])


# ------------------------------------------------------------------------- 3. released layout
def test_released_layout_round_trip(tmp_path):
    bb = tiny()
    names = save_released_layout(bb, tmp_path, max_shard_bytes=60_000)
    assert len(names) >= 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(bb.state_dict()) and set(index["weight_map"].values()) == set(names)
    assert "model.transformer.blocks.1.up_proj.weight" in index["weight_map"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["d_model"] == 64 and cfg["vocab_size"] == V and cfg["include_bias"] is False
    assert cfg["weight_tying"] is False and cfg["mask_token_id"] == V - 1

    x = tokens(2, 9)
    with torch.no_grad():
        ref = bb(x).logits
        f32 = LLaDABackbone(model_name_or_path=str(tmp_path), dtype="float32").eval()
        assert torch.equal(f32(x).logits, ref)
        assert (f32.vocab_size, f32.mask_id, f32.hidden_size) == (V, V - 1, 64)
        b16 = LLaDABackbone(model_name_or_path=str(tmp_path)).eval()  # pretrained default: bfloat16
        assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
        ref16 = tiny(dtype="bfloat16")  # same seed, same init → random build cast to bf16 for reference
        ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in bb.state_dict().items()})
        assert torch.equal(b16(x).logits, ref16(x).logits)
        assert (b16(x).logits.float() - ref).abs().max() < 0.05


def test_single_file_and_hub_id(tmp_path, monkeypatch):
    bb = tiny()
    save_released_layout(bb, tmp_path)  # one shard
    os.rename(tmp_path / "model-00001-of-00001.safetensors", tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors.index.json")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = LLaDABackbone(model_name_or_path="GSAI-ML/LLaDA-8B-Instruct", revision="a" * 40, dtype="float32")
    assert calls == [("GSAI-ML/LLaDA-8B-Instruct", "a" * 40, ["*.json", "*.safetensors"])]
    x = tokens(1, 5)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, bb(x).logits)


def _rewrite_shard(directory, change):
    """Apply ``change`` to the tensors of the shard holding ``ln_f.weight`` and fix the index."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.transformer.ln_f.weight"]
    tensors = change(load_file(directory / shard))
    save_file(tensors, directory / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def test_bad_checkpoints_name_the_key(tmp_path):
    bb = tiny()
    for case in ("missing", "misnamed", "shape"):
        d = tmp_path / case
        save_released_layout(bb, d, max_shard_bytes=60_000)
        if case == "missing":
            _rewrite_shard(d, lambda t: {k: v for k, v in t.items() if k != "model.transformer.ln_f.weight"})
        elif case == "misnamed":
            _rewrite_shard(d, lambda t: {("model.transformer.norm.weight" if k.endswith("ln_f.weight") else k): v
                                         for k, v in t.items()})
        else:
            _rewrite_shard(d, lambda t: {k: (v[:32] if k.endswith("ln_f.weight") else v) for k, v in t.items()})
        with pytest.raises(ValueError) as err:
            LLaDABackbone(model_name_or_path=str(d))
        assert "model.transformer.ln_f.weight" in str(err.value), case
        if case == "misnamed":
            assert "model.transformer.norm.weight" in str(err.value) and "unexpected 1" in str(err.value)
    bad = tmp_path / "bias"
    save_released_layout(bb, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "include_bias": True}))
    with pytest.raises(ValueError, match="include_bias"):
        LLaDABackbone(model_name_or_path=str(bad))
    with pytest.raises(ValueError, match="weight_tying"):
        LLaDABackbone(preset="tiny", config=dict(weight_tying=True))
    # the released config.json's other keys, nulls included, are accepted (null = the default)
    released = tmp_path / "released_keys"
    save_released_layout(bb, released)
    cfg = json.loads((released / "config.json").read_text())
    cfg.update({"multi_query_attention": None, "clip_qkv": None, "alibi": False, "rope": True, "block_type": "llama",
                "layer_norm_type": "rms", "activation_type": "silu", "block_group_size": 1, "scale_logits": False,
                "attention_layer_norm": False, "input_emb_norm": False, "include_bias": False, "weight_tying": False,
                "architectures": ["LLaDAModelLM"], "model_type": "llada", "init_device": "meta"})
    (released / "config.json").write_text(json.dumps(cfg))
    assert LLaDABackbone(model_name_or_path=str(released), dtype="float32").vocab_size == bb.vocab_size


def test_bf16_load_is_built_on_meta_and_fed_bf16_shards(tmp_path, monkeypatch):
    """Honest proxy for peak memory: the module exists only on the meta device until the shards arrive,
    each shard arrives already cast to bfloat16 (from float32 files), one shard per assignment."""
    bb = tiny()
    names = save_released_layout(bb, tmp_path, max_shard_bytes=60_000)  # float32 files
    seen = []
    original = torch.nn.Module.load_state_dict

    def spy(self, state, strict=True, assign=False):
        if isinstance(self, LLaDABackbone):
            meta = sum(p.is_meta for p in self.parameters())
            seen.append(({v.dtype for v in state.values()}, len(state), meta, assign, strict))
        return original(self, state, strict=strict, assign=assign)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy)
    b16 = LLaDABackbone(model_name_or_path=str(tmp_path), dtype="bfloat16")
    n_params = len(list(bb.parameters()))
    assert len(seen) == len(names)
    assert seen[0][2] == n_params  # first shard: every parameter still on meta
    assert all(dt == {torch.bfloat16} and assign and not strict for dt, _, _, assign, strict in seen)
    assert sum(n for _, n, _, _, _ in seen) == n_params
    assert not any(p.is_meta for p in b16.parameters()) and {p.dtype for p in b16.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ 4. size
def test_8b_preset_on_meta():
    bb = LLaDABackbone(preset="8b", device="meta")
    n = sum(p.numel() for p in bb.parameters())
    # embedding + output 2·126464·4096 = 1,035,993,088; per block 4·4096² + 3·4096·12288 + 2·4096 = 218,112,000,
    # × 32 = 6,979,584,000; final norm 4096 → 8,015,581,184
    assert n == 2 * 126464 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 4096 == 8_015_581_184
    assert round(n / 1e9, 2) == 8.02 and parameter_count("8b") == n
    assert all(p.is_meta for p in bb.parameters())
    assert (bb.vocab_size, bb.mask_id, bb.hidden_size, bb.eos_id, bb.pad_id, bb.bos_id, bb.eot_id) == (
        126464, 126336, 4096, 126081, 126081, 126080, 126348)
    names = set(bb.state_dict())
    assert len(names) == 3 + 32 * 9
    for name in ("model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
                 "model.transformer.blocks.31.attn_out.weight", "model.transformer.blocks.0.ff_norm.weight"):
        assert name in names


# ---------------------------------------------------------------------------- 5. gradient checkpointing
def test_gradient_checkpointing_same_gradients(monkeypatch):
    calls = []
    original = llada.checkpoint
    monkeypatch.setattr(llada, "checkpoint", lambda *a, **k: calls.append(k) or original(*a, **k))
    x = tokens(2, 8)
    keep = torch.ones(2, 8, dtype=torch.bool); keep[1, 6:] = False
    grads = []
    for ckpt in (False, True):
        bb = tiny(gradient_checkpointing=ckpt).train()
        out = bb(x, attention_mask=keep)
        (out.logits.float().logsumexp(-1).sum() + out.hidden_states.pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters()})
    assert len(calls) == 2 and all(k.get("use_reentrant") is False for k in calls)  # one per block, ckpt run only
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    with torch.no_grad():  # not in eval / no-grad
        tiny(gradient_checkpointing=True)(x)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ 6. MDM
def test_as_mdm_backbone():
    from prism.heads.quality import MLPHead
    from prism.model import MDM

    model = MDM(tiny(), MLPHead).eval()
    x = tokens(2, 7)
    x[:, 2:5] = model.mask_id
    with torch.no_grad():
        out = model(x)
    assert out.log_probs.shape == (2, 7, V) and out.quality_logits.shape == (2, 7)
    assert torch.allclose(out.log_probs[:, 2:5].exp().sum(-1), torch.ones(2, 3), atol=1e-4)


def test_registered_and_config_errors():
    from registry import BACKBONES

    assert "llada" in BACKBONES
    with pytest.raises(ValueError, match="preset"):
        LLaDABackbone()
    with pytest.raises(ValueError, match="Unknown LLaDA preset"):
        LLaDABackbone(preset="8B-typo")
    with pytest.raises(ValueError, match="mask_id"):
        LLaDABackbone(preset="tiny", mask_id=10_000)
    gqa = LLaDABackbone(preset="tiny", config=dict(n_kv_heads=2, vocab_size=V))
    assert gqa(tokens(1, 5)).logits.shape == (1, 5, V)


def test_a_quality_only_pass_skips_the_output_layer():
    """PRISM's pass on y asks the MDM for the quality only: LLaDA then never runs ff_out."""
    from prism.heads.quality import MLPHead
    from prism.model import MDM

    torch.manual_seed(0)
    model = MDM(LLaDABackbone(preset="tiny"), MLPHead).eval()
    calls = []
    model.backbone.model.transformer.ff_out.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 100, (2, 12))
    full = model(ids)
    only = model(ids, log_probs=False)
    assert calls == [1] and only.log_probs is None
    assert torch.equal(only.quality_logits, full.quality_logits)
