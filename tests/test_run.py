import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_PROCESSES_ENV, REPO, TORCHRUN, run_py
from prism.paths import DATA_ROOT


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def read_csv_rows(path, n=None):
    with open(path) as f:
        rows = [[int(v) for v in line.split(",")] for line in f if line.strip()]
    return rows[:n]


def sudoku_scores(tokens, puzzle):
    """The Sudoku metrics of one 89-token sample, recomputed here from their definition and
    independently of tasks/sudoku.py: cell (r, c) is token 10·r + c, token 10·r + 9 (r < 8) is the
    end-of-line 10; a unit (row, column, 3×3 box) is valid when it holds 1-9 exactly once; success =
    all 27 units valid, EOLs in place and every non-blank puzzle token (givens, EOLs) kept."""
    cell = lambda r, c: tokens[10 * r + c]  # noqa: E731
    units = [[cell(r, c) for c in range(9)] for r in range(9)]
    units += [[cell(r, c) for r in range(9)] for c in range(9)]
    units += [[cell(3 * br + i, 3 * bc + j) for i in range(3) for j in range(3)] for br in range(3) for bc in range(3)]
    valid = [sorted(u) == list(range(1, 10)) for u in units]
    eols = all(tokens[10 * r + 9] == 10 for r in range(8))
    kept = all(t == p for t, p in zip(tokens, puzzle) if p != 0)
    return {"success": float(all(valid) and eols and kept), "units_valid": sum(valid) / 27, "givens_kept": float(kept)}


def check_eval_outputs(out, puzzles):
    """Every sample's metrics in samples.jsonl equal the recomputed ones, and metrics.json's means
    equal the means over the samples; returns the per-sample scores."""
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert [s["index"] for s in samples] == list(range(len(puzzles))) and m["n"] == len(puzzles)
    scores = [sudoku_scores(s["tokens"], p) for s, p in zip(samples, puzzles)]
    for i, (s, want) in enumerate(zip(samples, scores)):
        for k, v in want.items():
            assert s[k] == pytest.approx(v, abs=1e-6), (i, k, s[k], v)  # float32 in the file
    for k in ("success", "units_valid", "givens_kept"):
        assert m[k] == pytest.approx(sum(w[k] for w in scores) / len(scores), abs=1e-6), k
    return scores


def test_train_sample_eval_end_to_end(tiny_gin, tmp_path):
    out = str(tmp_path / "run")
    run_py(["train", tiny_gin, "--output-dir", out])
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_00000004", "step_00000008"]
    assert os.path.exists(os.path.join(out, "checkpoints", ckpts[-1], "weights.safetensors"))
    metrics = read_metrics(out)
    assert sorted(metrics) == [2, 4, 6, 8] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics.values())

    operative = open(os.path.join(out, "train_operative_config.gin")).read()
    assert "train.steps = 8" in operative and "losses.mdlm.eps = 0.001" in operative
    info = json.load(open(os.path.join(out, "train_run_info.json")))
    assert info["versions"]["torch"] and info["versions"]["gin-config"] and "commit" in info["git"]

    run_py(["sample", tiny_gin, "--output-dir", out])
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert len(samples) == 12 and all(len(s["tokens"]) == 89 for s in samples)
    assert all(0 not in s["tokens"] for s in samples)  # nothing left masked

    proc = run_py(["eval", tiny_gin, "--output-dir", out])
    assert "loaded weights from" in proc.stdout + proc.stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["n"] == 12 and m["givens_kept"] == 1.0
    puzzles = read_csv_rows(os.path.join(DATA_ROOT, "sudoku", "hard_sudokus_dev.csv"), 12)
    check_eval_outputs(out, puzzles)
    assert 1 <= m["nfe"] <= 7  # at most STEPS = 6 forward passes + the final noise removal
    # sample and eval draw the same sequences from the same weights and seed
    again = [json.loads(l)["tokens"] for l in open(os.path.join(out, "samples.jsonl"))]
    assert again == [s["tokens"] for s in samples]

    # The hard puzzles score (almost) 0 for an 8-step model, which would not tell a correct success
    # metric from one that is always 0: evaluate a file whose answers are known without the model.
    # Rows 0-2: solved grids, given whole (success 1); rows 3-5: the same with cells (0, 0) and (0, 4)
    # swapped, given whole (row 0 stays valid; columns 0, 4 and boxes 0, 1 do not: 23/27, success 0);
    # rows 6-8: solved grids with 3 blanks; rows 9-11: hard puzzles.
    solved = read_csv_rows(os.path.join(DATA_ROOT, "sudoku", "easy_sudokus_answer_valid.csv"), 6)
    swapped = [g[:] for g in solved[:3]]
    for g in swapped:
        g[0], g[4] = g[4], g[0]
    blanked = [[0 if p in (12, 45, 78) else v for p, v in enumerate(g)] for g in solved[3:6]]
    mixed = solved[:3] + swapped + blanked + puzzles[:3]
    mixed_csv = tmp_path / "mixed.csv"
    mixed_csv.write_text("".join(",".join(map(str, r)) + "\n" for r in mixed))
    run_py(["eval", tiny_gin, "--output-dir", out, "--bind", f"tasks.sudoku.eval_file = '{mixed_csv}'"])
    scores = check_eval_outputs(out, mixed)
    assert [w["success"] for w in scores[:6]] == [1.0] * 3 + [0.0] * 3
    assert [w["units_valid"] for w in scores[:6]] == pytest.approx([1.0] * 3 + [23 / 27] * 3)
    assert sum(w["success"] for w in scores) >= 3 and all(w["givens_kept"] == 1.0 for w in scores)


SCHEDULE = ["--bind", "train.lr_schedule = 'cosine'", "--bind", "train.warmup_steps = 3", "--bind", "train.ema_decay = 0.9"]


def test_resume_reproduces_the_losses(tiny_gin, tmp_path):
    """Stop after the first logging step (max_minutes = 0), resume: the losses, learning rates and
    EMA weights equal those of an uninterrupted run (cosine schedule with warm-up, EMA on)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_py(["train", tiny_gin, "--output-dir", full, *SCHEDULE])
    proc = run_py(["train", tiny_gin, "--output-dir", part, *SCHEDULE, "--bind", "train.max_minutes = 0"])
    assert "max_minutes=0 reached at step 2" in proc.stdout + proc.stderr
    # a crash while saving leaves a temporary directory or one without trainer_state.json: never resumed from
    os.makedirs(os.path.join(part, "checkpoints", ".tmp-step_00000006"))
    os.makedirs(os.path.join(part, "checkpoints", "step_00000007"))
    proc = run_py(["train", tiny_gin, "--output-dir", part, *SCHEDULE, "--resume"])
    assert "step_00000002 at step 2" in proc.stdout + proc.stderr
    a, b = read_metrics(full), read_metrics(part)
    assert sorted(b) == [2, 4, 6, 8]  # each step logged once
    for step in (2, 4, 6, 8):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-6, abs=1e-7)
        assert a[step]["lr"] == pytest.approx(b[step]["lr"], rel=1e-9)
    assert a[4]["lr"] > a[8]["lr"]  # the cosine schedule is really decaying
    assert b[8]["elapsed_s"] > b[2]["elapsed_s"] > 0  # wall time accumulates across slices
    wa = load_file(os.path.join(full, "checkpoints", "step_00000008", "weights.safetensors"))
    wb = load_file(os.path.join(part, "checkpoints", "step_00000008", "weights.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_processes_synchronise_gradients(tiny_gin, tmp_path):
    """2 DDP processes (gloo on CPU) × batch 4 must land on the same weights as 1 process with 2
    accumulation micro-steps × batch 4: both see the same 8 sequences per step, and only an
    all-reduce of the gradients makes the 2-process run agree."""
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    binds = ["--bind", "train.batch_size = 4", "--bind", "train.steps = 4", "--bind", "train.log_every = 1", *SCHEDULE]
    run_py(["train", tiny_gin, "--output-dir", ddp, *binds], env=CPU_PROCESSES_ENV, launcher=TORCHRUN)
    run_py(["train", tiny_gin, "--output-dir", single, *binds, "--bind", "train.grad_accum = 2"])
    result = json.load(open(os.path.join(ddp, "train_result.json")))["train"]
    assert result["ranks_in_sync"] == 1.0
    state = json.load(open(os.path.join(ddp, "checkpoints", "step_00000004", "trainer_state.json")))
    assert state["world_size"] == 2
    wd = load_file(os.path.join(ddp, "checkpoints", "step_00000004", "weights.safetensors"))
    ws = load_file(os.path.join(single, "checkpoints", "step_00000004", "weights.safetensors"))
    assert all(torch.allclose(wd[k], ws[k], atol=2e-5) for k in wd)  # EMA weights
    # one scheduler step per optimizer step on every process count
    assert [r["lr"] for r in read_metrics(ddp).values()] == pytest.approx([r["lr"] for r in read_metrics(single).values()])
    # and training moved the weights (the comparison is not between two untouched copies)
    moved = [k for k in wd if "adaLN" in k and wd[k].abs().max() > 0]
    assert moved


def test_mixed_precision_follows_the_launcher_unless_gin_sets_it(monkeypatch, capsys):
    """run.mixed_precision None follows ``accelerate launch``'s config (ACCELERATE_MIXED_PRECISION),
    'no' without a launcher; a gin value wins and says so when it overrides a launcher's bf16."""
    from prism.training.distributed import mixed_precision_choice

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert mixed_precision_choice(None) == "no" and mixed_precision_choice("bf16") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert mixed_precision_choice(None) == "bf16"
    assert capsys.readouterr().err == ""
    assert mixed_precision_choice("no") == "no"
    assert "overrides the launcher's mixed_precision = 'bf16'" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert mixed_precision_choice("bf16") == "bf16" and capsys.readouterr().err == ""


def test_an_fsdp1_accelerate_config_on_cpu_processes_is_refused_before_the_accelerator(monkeypatch, tmp_path):
    """accelerate launch with an FSDP1 config on a machine without CUDA: a clear refusal (Accelerate
    itself would fall back to DDP without a word), before anything is built."""
    from prism.training.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(SystemExit, match="FSDP version 1, which runs only on GPUs.*fsdp_version: 2"):
        make_accelerator({"mixed_precision": None, "log_with": None}, str(tmp_path))


def test_bf16_mixed_precision_on_cpu(tiny_gin, tmp_path):
    """A bf16 run computes in bf16: its losses are finite, close to those of the same run in fp32
    (same seed, same batches) and not equal to them; equal losses would mean train.py's forward never
    ran under the bf16 autocast."""
    out, ref = str(tmp_path / "bf16"), str(tmp_path / "fp32")
    run_py(["train", tiny_gin, "--output-dir", out, "--bind", "run.mixed_precision = 'bf16'", "--bind", "train.steps = 2"])
    run_py(["train", tiny_gin, "--output-dir", ref, "--bind", "train.steps = 2"])
    info = json.load(open(os.path.join(out, "train_run_info.json")))
    assert info["mixed_precision"] == "bf16"
    assert json.load(open(os.path.join(ref, "train_run_info.json")))["mixed_precision"] == "no"
    bf16, fp32 = read_metrics(out), read_metrics(ref)
    assert sorted(bf16) == sorted(fp32) == [2]
    for step in bf16:
        a, b = bf16[step]["loss"], fp32[step]["loss"]
        assert math.isfinite(a) and math.isfinite(b)
        assert a != b and a == pytest.approx(b, rel=0.05), (a, b)


def test_bf16_autocast_runs_the_matmuls_in_bf16(tmp_path):
    """cli.make_accelerator with mixed_precision 'bf16' on CPU: under accelerator.autocast() (where
    train.py runs the loss forward) every nn.Linear of the model outputs bfloat16, outside it
    float32, and the MDLM loss is finite and differs from the fp32 one by bf16 rounding only."""
    from accelerate.state import AcceleratorState

    from prism import cli
    from prism.backbones.dit import DiT
    from prism.heads.quality import LinearHead
    from prism.losses.mdm import MDLMLoss
    from prism.model import MDM

    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), LinearHead)
    with torch.no_grad():  # the zero-initialised adaLN gates and output layers would make any precision give log 10
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    dtypes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, output: dtypes.append(output.dtype))
    x = torch.randint(1, 11, (4, 20), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "fixed": torch.zeros_like(x, dtype=torch.bool)}
    losses = {}
    AcceleratorState._reset_state(True)  # the Accelerate state is per process: start from none
    try:
        for precision in ("bf16", "no"):
            accelerator = cli.make_accelerator({"mixed_precision": precision, "log_with": None}, str(tmp_path))
            assert accelerator.device.type == "cpu"
            dtypes.clear()
            with accelerator.autocast():
                losses[precision] = MDLMLoss()(model, batch, torch.Generator().manual_seed(2)).loss
            assert len(dtypes) >= 10  # attention, MLP, adaLN and head layers all ran
            assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
            dtypes.clear()
            model(x)  # outside the autocast: float32 in either case
            assert set(dtypes) == {torch.float32}, precision
            AcceleratorState._reset_state(True)
    finally:
        AcceleratorState._reset_state(True)
    bf16, fp32 = losses["bf16"].item(), losses["no"].item()
    assert math.isfinite(bf16) and math.isfinite(fp32)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05), (bf16, fp32)


def test_hf_backbone_composes_from_gin(tiny_gin, tmp_path):
    """A tiny random Llama, used bidirectionally, swapped in for the DiT by bindings alone."""
    out = str(tmp_path / "hf")
    llama = ("{'model_type': 'llama', 'vocab_size': 11, 'hidden_size': 32, 'intermediate_size': 64, "
             "'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'max_position_embeddings': 128}")
    binds = ["--bind", "models.mdm.backbone = @backbones.hf()", "--bind", f"backbones.hf.config = {llama}",
             "--bind", "backbones.hf.mask_id = 0", "--bind", "train.steps = 4"]
    run_py(["train", tiny_gin, "--output-dir", out, *binds])
    run_py(["eval", tiny_gin, "--output-dir", out, *binds])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["n"] == 12 and m["givens_kept"] == 1.0
    assert "backbones.hf" in open(os.path.join(out, "eval_operative_config.gin")).read()


def test_training_again_into_a_used_directory_is_refused(tiny_gin, tmp_path):
    out = str(tmp_path / "used")
    run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.steps = 2", "--bind", "train.save_every = 2"])
    before = open(os.path.join(out, "checkpoints", "step_00000002", "weights.safetensors"), "rb").read()
    with pytest.raises(AssertionError, match="already holds checkpoints"):
        run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.steps = 2"])
    assert open(os.path.join(out, "checkpoints", "step_00000002", "weights.safetensors"), "rb").read() == before
    run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.steps = 2", "--overwrite"])
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 1


def test_export_latest_checkpoint(tiny_gin, tmp_path):
    out = str(tmp_path / "run")
    run_py(["train", tiny_gin, "--output-dir", out])
    target = str(tmp_path / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "prism.export", out, target], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.load(open(str(tmp_path / "model.json")))
    assert meta["step"] == 8 and "train.steps = 8" in meta["operative_config"] and meta["run_info"]["versions"]["torch"]
    assert open(target, "rb").read() == open(os.path.join(out, "checkpoints", "step_00000008", "weights.safetensors"), "rb").read()


def test_prism_and_token_critic_fine_tunes_compose_from_gin(tiny_gin, tmp_path):
    """MDM → PRISM fine-tune (new head, backbone + head train) and → Token-Critic (frozen MDM, new
    critic), each from gin bindings only, starting from the MDM's checkpoint."""
    mdm = str(tmp_path / "mdm")
    run_py(["train", tiny_gin, "--output-dir", mdm, "--bind", "train.steps = 4"])
    start = os.path.join(mdm, "checkpoints", "step_00000004")
    base = load_file(os.path.join(start, "weights.safetensors"))

    prism = str(tmp_path / "prism")
    run_py(["train", tiny_gin, "--output-dir", prism, "--bind", f"experiment.init_checkpoint = '{start}'",
            "--bind", "experiment.init_new = ['head']", "--bind", "models.mdm.head = @heads.linear",
            "--bind", "experiment.loss = @losses.prism()", "--bind", "losses.prism.k = 2",
            "--bind", "train.steps = 4"])
    m = read_metrics(prism)[4]
    assert {"bce", "nelbo", "head_acc", "head_ece", "fill_acc"} <= set(m) and m["bce"] > 0
    tuned = load_file(os.path.join(prism, "checkpoints", "step_00000004", "weights.safetensors"))
    assert any(k.startswith("head.") for k in tuned)
    assert not torch.equal(tuned["backbone.vocab_embed"], base["backbone.vocab_embed"])  # backbone trained too

    critic = str(tmp_path / "critic")
    run_py(["train", tiny_gin, "--output-dir", critic, "--bind", f"experiment.init_checkpoint = '{start}'",
            "--bind", "experiment.init_new = ['critic']", "--bind", "experiment.trainable = ['critic.*']",
            "--bind", "models.mdm.critic = @models.token_critic()",
            "--bind", "models.token_critic.backbone = @critic/backbones.dit()",
            "--bind", "experiment.loss = @losses.token_critic()", "--bind", "train.steps = 4"])
    assert {"bce", "critic_acc", "critic_ece"} <= set(read_metrics(critic)[4])
    tuned = load_file(os.path.join(critic, "checkpoints", "step_00000004", "weights.safetensors"))
    assert torch.equal(tuned["backbone.vocab_embed"], base["backbone.vocab_embed"])  # the MDM stayed frozen
    assert any(k.startswith("critic.") for k in tuned)

    # a PRISM fine-tune without init_new fails with a message that says what to set
    bad = subprocess.run([sys.executable, os.path.join(REPO, "run.py"), "train", tiny_gin, "--output-dir",
                          str(tmp_path / "bad"), "--bind", f"experiment.init_checkpoint = '{start}'",
                          "--bind", "models.mdm.head = @heads.linear"], capture_output=True, text=True)
    assert bad.returncode != 0 and "experiment.init_new" in bad.stderr


@pytest.mark.parametrize("sampler_gin,binds", [
    ("gin/samplers/semi_ar.gin", ["BLOCK_LENGTH = 10", "K_BLOCK = 2", "STEPS = 27"]),
    ("gin/samplers/prism.gin", ["NUM_REMASK = 2"]),
    ("gin/samplers/remdm_loop.gin", []),
    ("gin/samplers/dfm.gin", []),
])
def test_remasking_samplers_compose_from_gin(tiny_gin, tmp_path, sampler_gin, binds):
    """A model with a PRISM head, sampled by remasking samplers chosen in gin alone."""
    out = str(tmp_path / "run")
    head = ["--bind", "models.mdm.head = @heads.linear"]
    run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.steps = 2"] + head)
    args = ["eval", tiny_gin, os.path.join(REPO, sampler_gin), "--output-dir", out] + head
    for b in binds:
        args += ["--bind", b]
    run_py(args)
    m = json.load(open(os.path.join(out, "metrics.json")))
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert m["n"] == 12 and m["givens_kept"] == 1.0 and all(0 not in s["tokens"] for s in samples)


SAMPLER_GINS = sorted(f for f in os.listdir(os.path.join(REPO, "gin", "samplers")) if f.endswith(".gin"))
# settings a file needs on the 89-token tiny task (semi-AR: whole blocks, steps a multiple of their number)
SAMPLER_BINDS = {"semi_ar.gin": ["BLOCK_LENGTH = 10", "STEPS = 27"], "semi_ar_prism_authors.gin": ["STEPS = 27"]}


@pytest.mark.parametrize("sampler_gin", SAMPLER_GINS)
def test_every_sampler_gin_runs_from_run_py_sample(tiny_gin, tmp_path, sampler_gin):
    """`python run.py sample MODEL.gin gin/samplers/X.gin` for every file there (new files included),
    on a randomly initialised model that has a quality head and a Token-Critic."""
    out = str(tmp_path / "run")
    args = ["sample", tiny_gin, os.path.join(REPO, "gin", "samplers", sampler_gin), "--output-dir", out,
            "--bind", "models.mdm.head = @heads.linear", "--bind", "models.mdm.critic = @models.token_critic()",
            "--bind", "models.token_critic.backbone = @critic/backbones.dit()"]
    for b in SAMPLER_BINDS.get(sampler_gin, []):
        args += ["--bind", b]
    run_py(args)
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert len(samples) == 12 and all(len(s["tokens"]) == 89 and 0 not in s["tokens"] for s in samples)
    # the sampler that ran is the one the file names (mdlm.gin only configures base.gin's choice)
    chosen = [l.strip() for l in open(os.path.join(REPO, "gin", "samplers", sampler_gin)) if l.startswith("experiment.sampler")]
    assert len(chosen) <= 1
    expected = chosen[0] if chosen else "experiment.sampler = @samplers.mdlm()"
    assert expected in open(os.path.join(out, "sample_operative_config.gin")).read()


@pytest.mark.slow
def test_prism_and_token_critic_train_on_two_processes(tiny_gin, tmp_path):
    """Both fine-tuning losses under DDP: PRISM's two passes in one wrapped forward, and the
    Token-Critic (whose backbone's vocabulary layer gets no gradient: run.find_unused_parameters)."""
    torchrun, env = TORCHRUN, CPU_PROCESSES_ENV
    common = ["--bind", "train.steps = 2", "--bind", "train.log_every = 1"]
    prism = str(tmp_path / "prism")
    run_py(["train", tiny_gin, "--output-dir", prism, "--bind", "models.mdm.head = @heads.linear",
            "--bind", "experiment.loss = @losses.prism()", *common], env=env, launcher=torchrun)
    assert json.load(open(os.path.join(prism, "train_result.json")))["train"]["ranks_in_sync"] == 1.0
    critic = str(tmp_path / "critic")
    run_py(["train", tiny_gin, "--output-dir", critic, "--bind", "experiment.trainable = ['critic.*']",
            "--bind", "models.mdm.critic = @models.token_critic()",
            "--bind", "models.token_critic.backbone = @critic/backbones.dit()",
            "--bind", "experiment.loss = @losses.token_critic()", "--bind", "run.find_unused_parameters = True",
            *common], env=env, launcher=torchrun)
    assert json.load(open(os.path.join(critic, "train_result.json")))["train"]["ranks_in_sync"] == 1.0
