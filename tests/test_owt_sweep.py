"""benchmarks/owt_sweep.py end to end on random test-sized weights (a 'test' DiT, blocks of 32 tokens
of 60 offline Wikipedia articles): every sampler at N = 4 and 8 reports its NFE and a finite entropy,
the table / plot / samples are written, --resume skips what is done, bad input fails before sampling."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import gin
import pytest

from conftest import DEVICE_ENV, REPO, SHARED_DATA

pytestmark = pytest.mark.skipif(
    not (os.path.isdir(os.path.join(SHARED_DATA, "text", "wikipedia_en_wikiextractor"))
         and os.path.isdir(os.path.join(SHARED_DATA, "tokenizers", "gpt2"))),
    reason="needs ../shared/data/text and ../shared/data/tokenizers/gpt2")
SCRIPT = os.path.join(REPO, "benchmarks", "owt_sweep.py")
SAMPLERS = ["mdlm", "remdm_cap", "remdm_conf", "remdm_loop", "prism", "prism_loop"]


def load_script():
    spec = importlib.util.spec_from_file_location("owt_sweep", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, bindings): random base weights and a head-only PRISM file for the test DiT."""
    from prism import cli
    from prism.checkpoint import save_weights
    from prism.experiment import build_experiment

    d = tmp_path_factory.mktemp("owt_sweep")
    binds = [f"tasks.text.cache_dir = '{d / 'cache'}'", "tasks.text.max_documents = 60", "tasks.text.seq_len = 32",
             "DIT_PRESET = 'test'"]
    try:
        gin.clear_config()
        cli.parse_gin(["gin/owt/small_cpu.gin"], binds)
        model = build_experiment().model
        save_weights(model.state_dict(), model, str(d / "mdm.safetensors"))
        gin.clear_config()
        cli.parse_gin(["gin/owt/prism_cpu.gin"], binds + [f"experiment.init_checkpoint = '{d / 'mdm.safetensors'}'",
                                                          "experiment.loss = None"])
        model = build_experiment().model
        save_weights(model.state_dict(), model, str(d / "head.safetensors"), only=["head.*"])
    finally:
        gin.clear_config()
    return d, binds


def sweep(d, binds, *extra):
    args = [sys.executable, SCRIPT, "--mdm", str(d / "mdm.safetensors"), "--head", str(d / "head.safetensors"),
            "--n", "4", "--batch-size", "4", "--nfe", "4", "8", "--metrics", "entropy", "--loop-remask", "2",
            "--samples-at", "8", "--threads", "1", "--out", str(d / "out"), *extra]
    for b in binds:
        args += ["--bind", b]
    proc = subprocess.run(args, cwd=REPO, env=dict(os.environ, **DEVICE_ENV), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow  # 40 s: the default suite stays well under 15 minutes; CI runs it with -m slow
def test_sweep_end_to_end_and_resume(tiny):
    d, binds = tiny
    sweep(d, binds)
    out = d / "out"
    res = json.loads((out / "owt_sweep.json").read_text())
    assert set(res["configs"]) == {f"{s}@{n}" for s in SAMPLERS for n in (4, 8)}
    for key, c in res["configs"].items():
        assert c["nfe_per_batch"] and all(isinstance(x, int) and x > 0 for x in c["nfe_per_batch"]), key
        assert c["nfe"] == sum(c["nfe_per_batch"]) / len(c["nfe_per_batch"])
        assert 0 < c["metrics"]["entropy"] <= math.log(128) and math.isfinite(c["metrics"]["entropy"]), key
        assert len(c["first_texts"]) == 2 and c["seconds"] >= 0
    # PRISM-loop: N/2 steps + N/2 loop steps, one pass each
    assert res["configs"]["prism_loop@8"]["nfe"] == 8
    assert 0 < res["reference"]["entropy"] <= math.log(128) and res["reference"]["n"] == 4
    assert res["settings"]["top_p"] == 0.9 and "torch" in res["versions"] and res["argv"]
    md = (out / "owt_sweep.md").read_text()
    for row in ("MDLM", "ReMDM-cap", "ReMDM-conf", "ReMDM-loop", "PRISM", "PRISM-loop", "real text"):
        assert f"| {row} " in md
    assert "N = 4" in md and "N = 8" in md
    assert (out / "owt_sweep.png").stat().st_size > 0
    assert "## PRISM-loop" in (out / "owt_samples.md").read_text()

    proc = sweep(d, binds, "--resume")
    assert proc.stdout.count("done already, skipped") == 12
    again = json.loads((out / "owt_sweep.json").read_text())
    assert again["configs"] == res["configs"] and again["reference"] == res["reference"]


def test_bad_input_fails_before_sampling(tiny, tmp_path, capsys):
    d, _ = tiny
    main = load_script().main
    base = ["--mdm", str(d / "mdm.safetensors"), "--head", str(d / "head.safetensors"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="prism.export"):
        main(["--mdm", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="only 'head"):
        main(base[:2] + ["--head", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(base + ["--nfe", "6", "10", "--samplers", "prism_loop", "--nfe", "5"])
    assert "even" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--samplers", "prism", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing sampled, nothing written


def test_full_scale_owt_configs_compose():
    """gin/owt/mdlm_owt.gin (MDLM's 169.6M OWT model, 5000 samples, GPT-2 large metrics, nucleus 0.9) and
    gin/owt/prism_mdlm_owt.gin (Table 3's OWT fine-tune) parse and build the paper's model sizes."""
    import gin

    from prism import cli

    gin.clear_config()
    try:
        cli.parse_gin(["gin/owt/prism_mdlm_owt.gin", "gin/samplers/prism_owt.gin"], ["STEPS = 128"])
        assert gin.query_parameter("tasks.text.source") == "openwebtext"
        assert gin.query_parameter("tasks.text.n_eval") == 5000
        assert gin.query_parameter("metrics.gen_ppl.judge") == "gpt2-large"
        assert gin.query_parameter("losses.prism.k") == 8 and gin.query_parameter("losses.prism.n_y") == 4
        model = gin.get_configurable("models.mdm")()
        sampler = gin.get_configurable("samplers.prism_owt")()
    finally:
        gin.clear_config()
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert backbone == 169_627_218  # MDLM-OWT at vocabulary 50,258 (README)
    assert sampler.schedule.n_steps == 128
