"""What the full-size rehearsal needed that tiny models never showed: safetensors read without a
memory map straight into the model's storage (loading costs the model's bytes once), files written
tensor by tensor, and bf16 Linears that multiply in float32 on CPUs without bf16 units."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO
from prism.backbones import upcast_linear
from prism.backbones.llada import LLaDABackbone
from prism.backbones.llada_files import save_released_layout
from prism.backbones.upcast_linear import UpcastLinear
from prism.safetensors_stream import iter_tensors, read_header, write_streamed


def test_streamed_file_reads_back_with_the_reference_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {"a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.arange(7),
            "c": torch.randn(2, 2, 2, generator=g), "flag": torch.tensor([True, False])}
    path = str(tmp_path / "x.safetensors")
    n = write_streamed(path, [(k, v.shape, v.dtype) for k, v in want.items()], lambda k, s, d: want[k],
                       metadata={"note": "hi"})
    assert n == 30 + 56 + 32 + 2
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["note"] == "hi"
        for k, v in want.items():
            assert torch.equal(f.get_tensor(k), v)
    assert not os.path.exists(path + ".tmp")


def test_writer_failure_leaves_nothing(tmp_path):
    path = str(tmp_path / "x.safetensors")

    def produce(name, shape, dtype):
        if name == "b":
            raise RuntimeError("disk full")
        return torch.zeros(shape, dtype=dtype)

    with pytest.raises(RuntimeError, match="disk full"):
        write_streamed(path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)], produce)
    assert os.listdir(tmp_path) == []


def test_read_into_casts_through_a_bounded_buffer(tmp_path, monkeypatch):
    import prism.safetensors_stream as stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 64)  # 32 bf16 elements a slice: many slices
    src = {"w": torch.randn(37, 11).to(torch.bfloat16), "v": torch.randn(5)}
    path = str(tmp_path / "x.safetensors")
    save_file(src, path)
    got = dict(iter_tensors(path, lambda k, shape, dt: torch.empty(shape, dtype=torch.float32)))
    assert torch.equal(got["w"], src["w"].float()) and torch.equal(got["v"], src["v"])
    header, start = read_header(path)
    assert set(header) == {"w", "v"} and start > 8


def test_load_weights_reads_into_the_models_own_storage(tmp_path):
    from prism.checkpoint import load_weights

    m = torch.nn.Linear(4, 3)
    save_file({"weight": torch.ones(3, 4), "bias": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    ptr = m.weight.data_ptr()
    load_weights(m, str(tmp_path / "w.safetensors"))
    assert m.weight.data_ptr() == ptr and torch.equal(m.weight, torch.ones(3, 4))


MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {repo!r})
from prism.backbones.llada import LLaDABackbone
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
LLaDABackbone(preset='tiny', device='meta')  # imports and code paged in
base = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
bb = LLaDABackbone({path!r})
nbytes = sum(p.numel() * p.element_size() for p in bb.parameters())
print(json.dumps(dict(peak=status('VmHWM') - base, model=nbytes)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_loading_shards_costs_the_model_once(tmp_path):
    """A 117M-parameter bf16 model in 2 shards: the loader's high-water mark stays within the model's
    bytes + 48 MB (a memory-mapped get_tensor would add the largest shard's bytes, 117+ MB here)."""
    cfg = dict(d_model=1024, n_layers=4, n_heads=8, mlp_hidden_size=2816, vocab_size=32000)
    bb = LLaDABackbone(config=cfg, dtype="bfloat16")
    save_released_layout(bb, str(tmp_path), max_shard_bytes=120 * 2**20)
    del bb
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(repo=REPO, path=str(tmp_path))],
                         capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model"] > 200e6
    assert got["peak"] < got["model"] + 48 * 2**20, got


# ------------------------------------------------------------------------------- UpcastLinear
def rounded_reference(x, w):
    """bf16 GEMM semantics: bf16 operands, exact products, float32 sums, the output rounded to bf16."""
    return (x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T).to(torch.bfloat16)


@pytest.mark.parametrize("chunk", [10**9, 64])  # one slice; several slices of 64 elements (a few rows)
def test_upcast_forward_and_backward_are_the_bf16_product(monkeypatch, chunk):
    monkeypatch.setattr(upcast_linear, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    lin = UpcastLinear(16, 37, bias=False, dtype=torch.bfloat16, matmul="upcast")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 16, generator=g))
    lin.weight.requires_grad_(False)
    x = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 37)
    ref = rounded_reference(x.detach(), lin.weight)
    assert (y.detach().float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() / 128
    grad = torch.randn(2, 5, 37, generator=g).to(torch.bfloat16)
    y.backward(grad)
    gref = (grad.double() @ lin.weight.double()).to(torch.bfloat16)
    assert torch.allclose(x.grad.float(), gref.float(), rtol=1 / 64, atol=1e-2)
    # the native bf16 kernel agrees to bf16 rounding
    native = F.linear(x.detach(), lin.weight)
    assert torch.allclose(native.float(), y.detach().float(), rtol=1 / 64, atol=1e-2)


def test_upcast_under_autocast_and_weight_gradients():
    g = torch.Generator().manual_seed(1)
    lin = UpcastLinear(8, 6, bias=True, matmul="upcast")  # float32 weights, bf16 autocast
    ref_lin = torch.nn.Linear(8, 6)
    ref_lin.load_state_dict(lin.state_dict())
    x = torch.randn(4, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, r = lin(x), ref_lin(x)
    assert y.dtype == r.dtype == torch.bfloat16
    assert torch.allclose(y.float(), r.float(), rtol=1 / 64, atol=1e-2)
    y.float().sum().backward()
    r.float().sum().backward()
    assert torch.allclose(lin.weight.grad, ref_lin.weight.grad, rtol=1 / 32, atol=2e-2)
    assert torch.allclose(lin.bias.grad, ref_lin.bias.grad, rtol=1 / 32, atol=2e-2)


def test_native_mode_and_float32_are_untouched():
    lin = UpcastLinear(4, 3, matmul="native", dtype=torch.bfloat16)
    assert lin.use_upcast(torch.zeros(1, 4, dtype=torch.bfloat16)) is None
    assert UpcastLinear(4, 3, matmul="upcast").use_upcast(torch.zeros(1, 4)) is None  # float32: native
    with pytest.raises(ValueError, match="matmul must be one of"):
        UpcastLinear(4, 3, matmul="fast")


def test_llada_bf16_upcast_matches_native_and_trains_lora():
    import peft

    torch.manual_seed(0)
    native = LLaDABackbone(preset="tiny", dtype="bfloat16", matmul="native")
    up = LLaDABackbone(preset="tiny", dtype="bfloat16", matmul="upcast")
    up.load_state_dict(native.state_dict())
    ids = torch.randint(0, 120, (2, 12))
    a, b = native(ids).logits.float(), up(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), up)
    for n, p in up.named_parameters():
        p.requires_grad_("lora_" in n)
    up.train()
    up(ids).logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in up.named_parameters() if "lora_B" in n]
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    assert all(p.grad is None for n, p in up.named_parameters() if "lora_" not in n)
