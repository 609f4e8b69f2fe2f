"""Every shell command of the README and docs/ runs here, in a workspace of its own (a folder whose
gin/, benchmarks/*.py, ... are links to the checkout and whose weights/ is a copy, so the commands'
relative paths work and nothing they write lands in the checkout).

A cheap command runs as written. An expensive one is *rehearsed*: the same command line (launcher,
accelerate config, gin files, the command's own bindings) with bindings appended that shrink it to
this machine — they come last, so they win — listed per command in REHEARSALS:

- LLaDA-8B: a 2-layer LLaDA written in the released layout (config.json + shards + index, the file
  format the 8B loads from), LoRA r 8, the offline GPT-2 chat tokenizer, MBPP's train split as SFT
  data, 2 training steps, 2 problems scored by the executor;
- MDLM-OWT (170M): the test-sized DiT on the offline Wikipedia text, the offline judges; MDLM's
  Lightning .ckpt: one written here in its layout (``write_mdlm_ckpt``);
- Sudoku: 2 training steps, 8 puzzles;
- ``accelerate launch --config_file X``: 2 CPU processes (``--num_processes 2``) with X's settings
  (FSDP2 shards over gloo; DeepSpeed runs only where it is installed with GPUs).

A command that needs what this machine lacks (CUDA, DeepSpeed) is skipped with the reason; one run by
another test at a small size (benchmarks/full_size.py's profiles) names that test, which must exist.
The fast test checks that every documented command has exactly one plan here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest

from conftest import REPO, SHARED_DATA
from prism.cli import default_output_dir
from prism.training.checkpoints import RunDir
from test_docs import documented_commands

SUDOKU = ("train.steps = 2", "train.max_minutes = None", "tasks.sudoku.n_train_grids = 64", "train.batch_size = 8",
          "train.save_every = 1", "evaluate.limit = 8", "evaluate.batch_size = 8")
LLADA_8B = ("backbones.llada.model_name_or_path = '{ws}/llada_small'", "backbones.llada.mask_id = 50257",
            "adapters.lora.rank = 8", "adapters.lora.alpha = 8",
            "tasks.sft.source = 'mbpp-train'", "tasks.sft.tokenizer = 'gpt2-chat'", "tasks.sft.cache_dir = '{ws}/cache'",
            "tasks.sft.seq_len = 160", "tasks.sft.gen_length = 64", "losses.prism.window = 64",
            "losses.prism.mask_window = 64", "train.steps = 2", "train.batch_size = 1", "train.grad_accum = 1",
            "train.warmup_steps = 0", "train.save_every = 1", "evaluate.limit = 2", "evaluate.batch_size = 2")
CODE_EVAL = ("tasks.mbpp.tokenizer = 'gpt2-chat'", "tasks.mbpp.gen_length = 32", "tasks.humaneval.tokenizer = 'gpt2-chat'",
             "tasks.humaneval.gen_length = 32", "STEPS = 16", "BLOCK_LENGTH = 16")
OWT_SMALL = ("train.steps = 2", "train.max_minutes = None", "train.save_every = 1", "tasks.text.n_eval = 4")
OWT_FULL = ("DIT_PRESET = 'test'", "tasks.text.source = 'wikipedia-offline'", "tasks.text.tokenizer = None", "tasks.text.seq_len = 128",
            "tasks.text.num_proc = 1", "tasks.text.n_eval = 4", "train.steps = 2", "train.batch_size = 2",
            "train.warmup_steps = 0", "train.save_every = 1")
SWEEP = ("--nfe", "4", "--n", "4", "--batch-size", "4", "--samples-at", "4", "--metrics", "entropy")
ALLOW = (("PRISM_ALLOW_CODE_EXECUTION", "1"),)
MDLM_CONVERT = r"prism\.mdlm_weights convert mdlm\.ckpt runs/mdlm_owt\.safetensors$"
LLADA_TRAIN = "fsdp2_llada.yaml run.py train gin/sft/llada_lora_prism.gin"
ADAPTER = "runs/sft/llada_lora_prism/checkpoints/step_00000002/weights.safetensors"


@dataclass(frozen=True)
class Plan:
    binds: Tuple[str, ...] = ()      # appended --bind values of a run.py command
    args: Tuple[str, ...] = ()       # appended arguments of a benchmark (argparse: the last one wins)
    sub: Tuple[Tuple[str, str], ...] = ()  # (old, new) in the command line
    after: Tuple[str, ...] = ()      # patterns of documented commands whose runs this one reads
    skip_unless: Optional[str] = None  # 'cuda' | 'deepspeed'
    covered_by: Optional[str] = None  # 'tests/file.py::test_name' running the same script smaller
    env: Tuple[Tuple[str, str], ...] = ()  # variables the docs export on an earlier line


REHEARSALS = {
    # README
    r"run\.py eval gin/sudoku/quickstart\.gin$": Plan(binds=("evaluate.limit = 8",)),
    r"run\.py train gin/sudoku/quickstart_finetune\.gin$": Plan(binds=SUDOKU),
    r"^python -m prism\.data list$": Plan(),
    r"^python -m prism\.data fetch sudoku": Plan(),  # the files are present: checked, nothing fetched
    # docs/configuration.md, docs/samplers.md
    r"run\.py eval gin/sudoku/mdm\.gin .*steps101": Plan(binds=("evaluate.limit = 8",)),
    r"run\.py eval gin/sudoku/prism\.gin gin/samplers/semi_ar\.gin": Plan(binds=("evaluate.limit = 8",)),
    r"ddp\.yaml run\.py eval +gin/mbpp/llada_lora_prism_semiar\.gin gin/samplers/semi_ar_fast\.gin":
        Plan(binds=LLADA_8B + CODE_EVAL, after=(LLADA_TRAIN,)),
    # docs/testing.md, docs/performance.md
    r"^bash benchmarks/gpu_check\.sh$": Plan(skip_unless="cuda"),
    r"^GPU_CHECK_QUICK=1 bash benchmarks/gpu_check\.sh$": Plan(),
    r"full_size\.py llada8b$": Plan(covered_by="tests/test_full_size.py::test_llada_small_runs_every_phase_and_resumes"),
    r"full_size\.py llada_small$": Plan(covered_by="tests/test_full_size.py::test_llada_small_runs_every_phase_and_resumes"),
    r"full_size\.py mdlm_owt$": Plan(covered_by="tests/test_full_size.py::test_mdlm_small_converts_trains_and_sweeps"),
    # docs/distributed.md
    r"torchrun --standalone --nproc_per_node 2 run\.py train gin/sudoku/mdm\.gin --output-dir runs/ddp$": Plan(binds=SUDOKU),
    r"ddp\.yaml +run\.py train gin/sudoku/mdm\.gin$": Plan(binds=SUDOKU),
    r"fsdp2\.yaml run\.py train gin/sudoku/mdm\.gin$": Plan(binds=SUDOKU),
    r"zero3\.yaml run\.py train gin/sudoku/mdm\.gin": Plan(binds=SUDOKU, skip_unless="deepspeed"),
    # docs/plugins.md: the tutorial's files are written by its own test
    r"run\.py train my_plugins/sudoku_bigru\.gin": Plan(covered_by="tests/test_plugins.py::test_plugin_with_user_dir"),
    r"run\.py eval +my_plugins/sudoku_bigru\.gin": Plan(covered_by="tests/test_plugins.py::test_plugin_with_user_dir"),
    # docs/experiments/owt.md
    r"run\.py train gin/owt/tiny\.gin$": Plan(),
    r"run\.py train gin/owt/small_cpu\.gin": Plan(binds=OWT_SMALL),
    r"run\.py train gin/owt/prism_cpu\.gin": Plan(binds=OWT_SMALL),
    r"owt_sweep\.py --samplers": Plan(args=SWEEP),
    r"prism\.export runs/owt_mdm ": Plan(after=(r"train gin/owt/small_cpu\.gin",)),
    r"prism\.export runs/owt_prism ": Plan(after=(r"train gin/owt/prism_cpu\.gin",)),
    r"prism\.mdlm_weights convert mdlm\.ckpt runs/mdlm_owt\.safetensors$": Plan(after=("make mdlm.ckpt",)),
    r"prism\.mdlm_weights convert mdlm\.ckpt runs/mdlm_raw": Plan(after=("make mdlm.ckpt",)),
    r"ddp\.yaml run\.py train gin/owt/prism_mdlm_owt\.gin": Plan(binds=OWT_FULL + ("train.ema_decay = 0.0",),
                                                                  after=(MDLM_CONVERT,)),
    r"owt_sweep\.py --mdm-gin gin/owt/mdlm_owt\.gin": Plan(
        args=SWEEP + ("--judge", "smollm2-135m", "--featurizer", "minilm") + sum((("--bind", b) for b in OWT_FULL[:5]), ()),
        sub=(("step_00020000", "step_00000002"),), after=("prism_mdlm_owt.gin  --output-dir",)),
    # docs/experiments/sudoku.md
    r"nproc_per_node 2 run\.py train gin/sudoku/mdm\.gin +--output-dir runs/sudoku_mdm": Plan(binds=SUDOKU),
    r"nproc_per_node 2 run\.py train gin/sudoku/prism\.gin": Plan(binds=SUDOKU),
    r"nproc_per_node 2 run\.py train gin/sudoku/token_critic\.gin": Plan(binds=SUDOKU),
    r"nproc_per_node 2 run\.py train gin/sudoku/prism_kuniform\.gin": Plan(binds=SUDOKU),
    r"prism\.export runs/sudoku_mdm ": Plan(after=(r"nproc_per_node 2 run\.py train gin/sudoku/mdm\.gin +--output-dir runs/sudoku_mdm",)),
    r"prism\.export runs/prism ": Plan(after=(r"nproc_per_node 2 run\.py train gin/sudoku/prism\.gin",)),
    r"prism\.export runs/token_critic ": Plan(after=(r"nproc_per_node 2 run\.py train gin/sudoku/token_critic\.gin",)),
    r"prism\.export runs/prism_kuniform ": Plan(after=(r"nproc_per_node 2 run\.py train gin/sudoku/prism_kuniform\.gin",)),
    # docs/experiments/llada_mbpp.md
    r"^python run\.py train gin/sft/tiny\.gin$": Plan(),
    r"run\.py train gin/sft/tiny\.gin --resume": Plan(after=("^python run.py train gin/sft/tiny.gin$",)),
    r"fsdp2_llada\.yaml run\.py train gin/sft/llada_lora_prism\.gin$": Plan(binds=LLADA_8B),
    r"zero3_llada\.yaml run\.py train gin/sft/llada_lora_prism\.gin$": Plan(binds=LLADA_8B, skip_unless="deepspeed"),
    r"run\.py sample gin/sft/llada_lora_prism\.gin": Plan(binds=LLADA_8B, sub=(("step_00044000", "step_00000002"),),
                                                          after=(LLADA_TRAIN,)),
    r"run\.py train gin/mbpp/tiny\.gin$": Plan(binds=("train.steps = 2", "evaluate.limit = 2")),
    r"run\.py eval gin/mbpp/tiny\.gin$": Plan(binds=("evaluate.limit = 2",), after=("run.py train gin/mbpp/tiny.gin$",)),
    r"run\.py eval gin/humaneval/tiny\.gin$": Plan(binds=("evaluate.limit = 2",)),
    r"accelerate launch run\.py eval gin/humaneval/llada_lora_prism_semiar\.gin": Plan(binds=LLADA_8B + CODE_EVAL,
                                                                                       after=(LLADA_TRAIN,)),
    r"ddp\.yaml run\.py eval \$G .*K_BLOCK = 6\"  --bind \"experiment\.init": Plan(binds=LLADA_8B + CODE_EVAL, after=(LLADA_TRAIN,), env=ALLOW),
    r"ddp\.yaml run\.py eval \$G .*remask_rules\.random": Plan(binds=LLADA_8B + CODE_EVAL, after=(LLADA_TRAIN,), env=ALLOW),
    r"ddp\.yaml run\.py eval \$G .*K_BLOCK = 0": Plan(binds=LLADA_8B + CODE_EVAL, env=ALLOW),
}
# Prerequisites that no documented command makes: a released file the docs assume downloaded.
def write_mdlm_ckpt(ws: "Workspace") -> None:
    """MDLM's Lightning .ckpt (state_dict with the rotary buffer, the EMA's shadow_params in MDLM's
    order, hyper_parameters) of the test-sized DiT over GPT-2 + mask, standing in for MDLM-OWT's."""
    import torch

    from prism.backbones.dit import DiT
    from prism.mdlm_weights import mdlm_hf_state, mdlm_parameter_names
    from prism.model import MDM

    torch.manual_seed(0)
    model = MDM(DiT(preset="test", vocab_size=50258, mask_id=50257))
    ema = mdlm_hf_state(model, rotary=False)
    torch.save({"state_dict": mdlm_hf_state(model), "hyper_parameters": {"config": {"backbone": "dit"}},
                "ema": {"decay": 0.9999, "shadow_params": [ema[n] for n in mdlm_parameter_names(2)]}},
               os.path.join(ws.root, "mdlm.ckpt"))


SETUP = {"make mdlm.ckpt": write_mdlm_ckpt}


def plan_of(cmd: str) -> Tuple[str, Plan]:
    hits = [(k, p) for k, p in REHEARSALS.items() if re.search(k, cmd)]
    assert len(hits) == 1, f"{cmd!r} matches {len(hits)} rehearsal plans: {[k for k, _ in hits]}"
    return hits[0]


def test_every_documented_command_has_one_plan():
    """A command added to the docs without a plan here fails this test; a plan no command uses too."""
    commands = [c for _, c in documented_commands()]
    used = {plan_of(c)[0] for c in commands}
    assert used == set(REHEARSALS), f"plans without a documented command: {set(REHEARSALS) - used}"
    for cmd in commands:
        plan = plan_of(cmd)[1]
        for pattern in plan.after:
            assert pattern in SETUP or any(re.search(pattern, c) for c in commands), (cmd, pattern)
        if plan.covered_by:
            path, name = plan.covered_by.split("::")
            assert f"def {name}(" in open(os.path.join(REPO, path)).read(), plan.covered_by
            script = re.search(r"benchmarks/\w+\.py|my_plugins", cmd).group(0)
            assert os.path.basename(script) in open(os.path.join(REPO, path)).read() or "plugin" in path


class Workspace:
    """A folder that looks like the checkout to the commands and keeps what they write."""

    def __init__(self, root: str):
        self.root = root
        for name in ("run.py", "gin", "accelerate_configs", "prism", "tasks", "registry", "tests", "setup.cfg"):
            os.symlink(os.path.join(REPO, name), os.path.join(root, name))
        shutil.copytree(os.path.join(REPO, "weights"), os.path.join(root, "weights"))  # the export commands write there
        os.makedirs(os.path.join(root, "benchmarks", "results"))
        for name in os.listdir(os.path.join(REPO, "benchmarks")):
            if name.endswith((".py", ".sh")):
                os.symlink(os.path.join(REPO, "benchmarks", name), os.path.join(root, "benchmarks", name))
        self.done = {}
        self.commands = [c for _, c in documented_commands()]
        self.env = dict(os.environ, PRISM_DATA=SHARED_DATA, CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0",
                        HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                        G="gin/mbpp/llada_lora_prism_semiar.gin", ADAPTER=ADAPTER)
        self.env.pop("ACCELERATE_MIXED_PRECISION", None)

    def llada_weights(self) -> None:
        """The 2-layer LLaDA of benchmarks/full_size.py's small profile, in the released layout."""
        if not os.path.exists(os.path.join(self.root, "llada_small")):
            sys.path.insert(0, os.path.join(REPO, "benchmarks"))
            from full_size_llada import write_llada
            from full_size_phases import PROFILES

            write_llada(PROFILES["llada_small"], os.path.join(self.root, "llada_small"))

    def rehearsal(self, cmd: str) -> str:
        """The command line this test runs for a documented command."""
        plan = plan_of(cmd)[1]
        for old, new in plan.sub:
            cmd = cmd.replace(old, new)
        if "accelerate launch --config_file" in cmd:
            cmd = cmd.replace("accelerate launch --config_file", "accelerate launch --num_processes 2 --config_file")
        words = shlex.split(cmd.replace("$G", self.env["G"]).replace("$ADAPTER", ADAPTER))
        if re.search(r"\brun\.py (train|eval|sample)\b", cmd):
            for b in plan.binds:
                words += ["--bind", b.format(ws=self.root)]
        words += list(plan.args)
        return " ".join(shlex.quote(w) if not re.fullmatch(r"[A-Z_]+=\S*", w) else w for w in words)

    def run(self, cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a documented command's rehearsal once (and first the runs it reads)."""
        if cmd in self.done:
            return self.done[cmd]
        plan = plan_of(cmd)[1]
        for pattern in plan.after:
            if pattern in SETUP:
                if pattern not in self.done:
                    self.done[pattern] = SETUP[pattern](self)
                continue
            prior = next(c for c in self.commands if re.search(pattern, c))
            proc = self.run(prior)
            assert proc.returncode == 0, f"{prior} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        if "llada_small" in "".join(plan.binds):
            self.llada_weights()
        line = self.rehearsal(cmd)
        out = output_dir(line)
        if out and not plan.after and os.path.isdir(os.path.join(self.root, out)):
            shutil.rmtree(os.path.join(self.root, out))  # an earlier command's run in the same default folder
        self.done[cmd] = self.shell(line, timeout, dict(plan.env))
        return self.done[cmd]

    def shell(self, line: str, timeout: int, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=self.root, env=dict(self.env, **(env or {})),
                              capture_output=True, text=True, timeout=timeout)


def output_dir(line: str) -> Optional[str]:
    """Where a run.py command writes: its --output-dir, else run.py's default for its first gin file."""
    words = shlex.split(line)
    if "--output-dir" in words:
        return words[words.index("--output-dir") + 1]
    return default_output_dir(words[words.index("run.py") + 2]) if "run.py" in words else None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = Workspace(str(tmp_path_factory.mktemp("docs_workspace")))
    yield ws
    shutil.rmtree(ws.root, ignore_errors=True)


def params():
    out, seen = [], set()
    for doc, cmd in documented_commands():
        if cmd in seen:  # the same command on two pages runs once
            continue
        seen.add(cmd)
        hits = [p for k, p in REHEARSALS.items() if re.search(k, cmd)]
        if len(hits) != 1:
            continue  # test_every_documented_command_has_one_plan says which
        plan = hits[0]
        if not plan.covered_by:
            out.append(pytest.param(cmd, id=f"{doc}:{cmd[:70]}"))
    return out


def missing(plan: Plan) -> Optional[str]:
    """Why this machine cannot run the command (None: it can)."""
    import torch

    if plan.skip_unless == "cuda" and not torch.cuda.is_available():
        return "needs CUDA (a GPU machine)"
    if plan.skip_unless == "deepspeed" and not (importlib.util.find_spec("deepspeed") and torch.cuda.is_available()):
        return "needs DeepSpeed with GPUs"
    return None


def check(ws: Workspace, cmd: str) -> None:
    plan = plan_of(cmd)[1]
    reason = missing(plan)
    if reason:
        pytest.skip(reason)
    started = time.time()
    proc = ws.run(cmd)
    line = ws.rehearsal(cmd)
    assert proc.returncode == 0, f"{line}\nfailed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    written = re.search(r"-m prism\.(export|mdlm_weights convert) \S+ (\S+)", line)
    if written:  # a weights file, written by this command (the workspace's weights/ is a copy)
        from safetensors import safe_open

        path = os.path.join(ws.root, written.group(2))
        assert os.path.getmtime(path) >= started - 1, path
        with safe_open(path, "pt") as f:
            assert list(f.keys()), path
    out = output_dir(line)
    if not out:
        return
    run = RunDir(os.path.join(ws.root, out))
    command = re.search(r"run\.py (train|eval|sample)", line).group(1)
    info = json.load(open(run.run_info(command)))
    if "torchrun" in line or "--num_processes 2" in line:
        assert info["num_processes"] == 2, (line, info["num_processes"])
    if "--config_file" in line:  # every shipped accelerate config asks for bf16; the gin files leave it or agree
        assert info["mixed_precision"] == "bf16", (line, info["mixed_precision"])
    if command == "train":
        state = run.state(run.checkpoints()[-1])
        assert state["layout"] == ("fsdp2" if "fsdp2" in line else "ddp" if info["num_processes"] == 2 else "single")
    else:
        assert [f for f in os.listdir(run.path) if f.startswith(("samples", "metrics"))], os.listdir(run.path)


@pytest.mark.slow  # 44 commands: about 10 minutes on 2 cores
@pytest.mark.parametrize("cmd", params())
def test_documented_command_rehearsed(workspace, cmd):
    check(workspace, cmd)
