import torch

from prism.backbones.hf import HFBackbone
from prism.model import MDM

TINY_LLAMA = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)


def tiny(attn="eager"):
    torch.manual_seed(0)
    return HFBackbone(config=TINY_LLAMA, attn_implementation=attn).eval()


def test_contract_fields():
    bb = tiny()
    assert (bb.vocab_size, bb.mask_id, bb.hidden_size) == (40, 39, 32)


def test_attention_is_bidirectional():
    for attn in ("eager", "sdpa"):
        bb = tiny(attn)
        x = torch.randint(0, 39, (1, 10))
        y = x.clone(); y[0, -1] = (x[0, -1] + 1) % 39
        # a causal model's first position could not see the last token
        assert not torch.allclose(bb(x).logits[0, 0], bb(y).logits[0, 0], atol=1e-6), attn


def test_padding_does_not_leak():
    for attn in ("eager", "sdpa"):
        bb = tiny(attn)
        x = torch.randint(0, 39, (2, 10))
        keep = torch.ones(2, 10, dtype=torch.bool); keep[:, 7:] = False
        y = x.clone(); y[:, 7:] = (x[:, 7:] + 5) % 39
        a, b = bb(x, attention_mask=keep).logits[:, :7], bb(y, attention_mask=keep).logits[:, :7]
        assert torch.allclose(a, b, atol=1e-5), attn


def test_hidden_state_is_what_the_lm_head_reads():
    bb = tiny()
    out = bb(torch.randint(0, 39, (2, 8)))
    assert torch.allclose(bb.model.lm_head(out.hidden_states), out.logits, atol=1e-5)


def test_from_pretrained_local_directory(tmp_path):
    bb = tiny()
    bb.model.save_pretrained(tmp_path)
    again = HFBackbone(model_name_or_path=str(tmp_path), attn_implementation="eager").eval()
    x = torch.randint(0, 39, (1, 9))
    assert torch.allclose(bb(x).logits, again(x).logits, atol=1e-6)


def test_mdm_subs_on_hf_backbone():
    model = MDM(tiny())
    x = torch.randint(0, 39, (1, 6)); x[0, 2] = 39
    lp = model(x).log_probs
    assert torch.isneginf(lp[0, 2, 39])  # mask gets zero probability
    assert torch.allclose(lp[0, 2].exp().sum(), torch.tensor(1.0), atol=1e-5)
    assert lp[0, 0, x[0, 0]] == 0  # clean tokens carry over
