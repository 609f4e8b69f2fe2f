import torch

from prism.backbones.dit import DiT
from tasks.sudoku import sudoku_position_groups


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_mdlm_and_prism():
    # PRISM's Sudoku DiT (vocab 11) and MDLM's OWT DiT (vocab 50258), counted as their code counts.
    assert n_params(DiT(vocab_size=11, mask_id=0, preset="tiny")) == 28_558_091
    assert n_params(DiT(vocab_size=50258, mask_id=50257, preset="small")) == 169_627_218


def test_output_shapes_and_zero_init_logits():
    m = DiT(vocab_size=11, mask_id=0, preset="test")
    out = m(torch.randint(0, 11, (3, 89)))
    assert out.logits.shape == (3, 89, 11) and out.hidden_states.shape == (3, 89, 32)
    # adaLN-zero / zero-initialised output layer: the untrained model predicts uniformly
    assert torch.all(out.logits == 0)


def _trained_like(m):
    torch.manual_seed(0)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def test_padding_is_never_attended():
    m = _trained_like(DiT(vocab_size=11, mask_id=0, preset="test")).eval()
    x = torch.randint(1, 10, (1, 12))
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 9:] = False
    y = x.clone()
    y[0, 9:] = (x[0, 9:] % 9) + 1  # change only padding tokens
    a = m(x, attention_mask=keep).logits[0, :9]
    b = m(y, attention_mask=keep).logits[0, :9]
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(m(x).logits[0, :9], m(y).logits[0, :9], atol=1e-6)


def test_group_attention_restricts_one_block_to_peers():
    groups = sudoku_position_groups()
    m = _trained_like(DiT(vocab_size=11, mask_id=0, preset="test", n_blocks=1,
                          position_groups=groups, group_attention=True)).eval()
    x = torch.randint(1, 10, (1, 89))
    # cell (0,0) is token 0; cell (4,4) is token 44: no shared row, column or box
    y = x.clone(); y[0, 44] = x[0, 44] % 9 + 1
    assert torch.allclose(m(x).logits[0, 0], m(y).logits[0, 0], atol=1e-6)
    # cell (0,5) (token 5) shares row 0 with token 0
    y = x.clone(); y[0, 5] = x[0, 5] % 9 + 1
    assert not torch.allclose(m(x).logits[0, 0], m(y).logits[0, 0], atol=1e-6)


def test_time_conditioning_changes_the_output_only_when_on():
    x = torch.randint(0, 11, (2, 10))
    t1, t2 = torch.tensor([0.2, 0.2]), torch.tensor([0.9, 0.9])
    off = _trained_like(DiT(vocab_size=11, mask_id=0, preset="test")).eval()
    assert torch.allclose(off(x, t=t1).logits, off(x, t=t2).logits)
    on = _trained_like(DiT(vocab_size=11, mask_id=0, preset="test", time_conditioning=True)).eval()
    assert not torch.allclose(on(x, t=t1).logits, on(x, t=t2).logits)


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    """Recomputed blocks (dropout replayed from the saved RNG state) give the gradients of the plain
    pass, with far fewer tensors saved for backward; each block runs again in backward, only when
    training with a graph."""
    grads, calls, saved = [], [], []
    for ckpt in (False, True):
        m = _trained_like(DiT(vocab_size=11, mask_id=0, preset="test", dropout=0.1, gradient_checkpointing=ckpt))
        count, n_saved, plain = [0], [0], m.blocks[0].forward

        def counted(*args, **kwargs):
            count[0] += 1
            return plain(*args, **kwargs)

        def pack(t):
            n_saved[0] += 1
            return t

        m.blocks[0].forward = counted
        m.train()
        torch.manual_seed(1)
        ids = torch.randint(0, 11, (2, 17))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(ids).logits.square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        with torch.no_grad():  # no graph: no recomputation either
            m(ids)
        calls.append(count[0])
        saved.append(n_saved[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert calls == [2, 3]  # plain: forward + no-grad pass; checkpointed: + the recomputation
    assert saved[1] < saved[0] / 3
