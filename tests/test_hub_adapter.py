"""Hub-shaped adapters (``prism.hub_adapter``, ``python -m prism.export RUN OUT --hub``): a tiny LoRA + PRISM
run exported as a folder that ``peft.PeftModel.from_pretrained`` loads onto the base model with the same
logits as the run's own model, and that ``experiment.init_adapter`` loads back (LoRA and head)."""
import copy
import json
import os

import gin
import pytest
import torch

from conftest import SHARED_DATA, run_py

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mbpp", "mbpp.jsonl")),
                                reason="needs ../shared/data/mbpp")


def build(config: str, *binds: str):
    """The model of a gin config (text, or a file under gin/ when it ends in .gin) with ``binds``."""
    from accelerate.utils import set_seed

    from prism import cli
    from prism.experiment import build_experiment

    gin.clear_config()
    try:
        cli.load_builtin_components()
        if config.endswith(".gin"):
            cli.parse_gin([config], list(binds))
        else:
            gin.parse_config(config)
            gin.parse_config("\n".join(binds))
        set_seed(0)  # as run.py: the same random base weights as the run's
        return build_experiment().model.eval()
    finally:
        gin.clear_config()


def test_export_loads_in_peft_and_back(tmp_path):
    from peft import PeftModel

    from prism import export

    out = str(tmp_path / "run")
    run_py(["train", "gin/sft/tiny.gin", "--output-dir", out, "--bind", "train.steps = 2", "--bind",
            "run.eval_after_train = False", "--bind", f"tasks.sft.cache_dir = '{tmp_path / 'cache'}'",
            "--bind", "train.lr = 0.05"])  # a large step: LoRA's B leaves zero, the adapter changes the logits
    folder = str(tmp_path / "hub")
    export.main([out, folder, "--hub"])
    files = sorted(os.listdir(folder))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "prism_provenance.json",
                     "quality_head.safetensors"]
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 8, 8.0,
                                                                                      ["q_proj", "k_proj", "v_proj"])
    card = open(os.path.join(folder, "README.md")).read()
    assert "library_name: peft" in card and "lora.rank = 8" in card and '"step": 2' in card
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys[0].startswith("base_model.model.model.transformer.blocks.0.") and keys[0].endswith(".lora_A.weight")

    config = open(os.path.join(out, "train_config.gin")).read()
    ckpt = os.path.join(out, "checkpoints", "step_00000002", "weights.safetensors")
    ours = build(config, f"experiment.init_adapter = '{ckpt}'")               # the run's own adapter checkpoint
    base = build(config, "experiment.adapter = None", "experiment.trainable = None")
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.backbone(ids).logits
        assert not torch.allclose(want, base.backbone(ids).logits)            # the adapter does something
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base.backbone), folder).eval()
        got = peft_model(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
        back = build(config, f"experiment.init_adapter = '{folder}'")         # the folder, back into prism
        assert torch.equal(back.backbone(ids).logits, want)
        assert all(torch.equal(a, b) for a, b in zip(back.head.parameters(), ours.head.parameters()))


def test_a_folder_of_another_rank_is_refused(tmp_path):
    from prism.hub_adapter import ADAPTER_CONFIG, load_hub_folder

    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16}))
    model = build("gin/sft/tiny.gin")
    with pytest.raises(ValueError, match="r = 16, lora_alpha = 16, but the model's LoRA has r = 8"):
        load_hub_folder(model, str(tmp_path), model.backbone)
    plain = build("gin/sft/tiny.gin", "experiment.adapter = None", "experiment.trainable = None")
    with pytest.raises(ValueError, match="experiment.adapter = @adapters.lora"):
        load_hub_folder(plain, str(tmp_path), plain.backbone)
