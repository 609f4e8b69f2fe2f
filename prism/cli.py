"""The command line of ``run.py`` and of the ``prism`` console script: parse the CLI → gin files +
bindings (+ --user-dir plugins) → data and sandbox checks → build on every rank → train | sample | eval.

    python run.py {train,sample,eval} CONFIG.gin [MORE.gin ...] [--bind "name.param = value"]...
                  [--user-dir DIR]... [--output-dir DIR] [--resume]
    prism {train,sample,eval} ...                       # the same, once the package is installed

One process on a CPU, or N processes with ``accelerate launch`` / ``torchrun`` (every rank parses the
same gin config before building the model; only the main process writes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from typing import Dict, List, Optional

import gin

from prism.config import GinConfigError, resolve_config
from prism.config import check_bindings as _check_bindings, parse_gin as _parse_gin
from prism.paths import REPO_ROOT, write_text_atomic
from prism.training.distributed import make_accelerator  # noqa: F401  (run.make_accelerator for callers)
from registry import import_user_dir, load_builtin_components

VERSIONED = ["torch", "accelerate", "transformers", "peft", "gin-config", "safetensors", "numpy", "datasets"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "sample", "eval"])
    p.add_argument("configs", nargs="+", help="gin files (paths, or relative to the repo's gin/ folder)")
    p.add_argument("--bind", action="append", default=[], help='a gin binding, e.g. "train.steps = 10"')
    p.add_argument("--user-dir", action="append", default=[], help="a plugin directory to import")
    p.add_argument("--output-dir", default=None, help="default: runs/<name of the first gin file>, under the working directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch even though --output-dir holds checkpoints (they are deleted)")
    return p.parse_args(argv)


def parse_gin(configs: List[str], bindings: List[str]) -> None:
    """``prism.config.parse_gin``, its errors as an exit message."""
    try:
        _parse_gin(configs, bindings)
    except GinConfigError as err:
        raise SystemExit(str(err)) from None


def check_bindings(bindings: List[str]) -> None:
    try:
        _check_bindings(bindings)
    except GinConfigError as err:
        raise SystemExit(str(err)) from None


def git_commit() -> Dict[str, Optional[str]]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions(packages=VERSIONED) -> dict:
    """The installed version of each package (None when it is not installed)."""
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def run_info(args: argparse.Namespace, accelerator) -> dict:
    versions = package_versions()
    return {
        "argv": sys.argv,
        "command": args.command,
        "configs": args.configs,
        "bindings": args.bind,
        "user_dirs": args.user_dir,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "versions": versions,
        "git": git_commit(),
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@gin.configurable("run")
def run_options(
    mixed_precision: Optional[str] = None,
    log_with: Optional[str] = None,
    eval_before_train: bool = False,
    eval_after_train: bool = False,
    project_name: str = "prism",
    overwrite: bool = False,
    find_unused_parameters: bool = False,
):
    """Process-level settings. ``mixed_precision``: 'no' | 'bf16' | 'fp16' (fp16 needs CUDA), or None
    (default): the launcher's choice (``accelerate launch``'s config or ``--mixed_precision``), else 'no';
    ``log_with``: an Accelerate tracker ('tensorboard', 'wandb', ...); ``eval_before_train`` /
    ``eval_after_train``: run ``evaluate`` around training and print a results table;
    ``overwrite``: as ``--overwrite`` (for demo runs whose results are cheap to remake);
    ``find_unused_parameters``: tell DDP that some trainable parameters may get no gradient in a step
    (e.g. the vocabulary layer of a Token-Critic's backbone, whose logits the critic never reads)."""
    return dict(mixed_precision=mixed_precision, log_with=log_with, eval_before_train=eval_before_train,
                eval_after_train=eval_after_train, project_name=project_name, overwrite=overwrite,
                find_unused_parameters=find_unused_parameters)


def format_table(rows: List[dict], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def default_output_dir(config: str) -> str:
    """runs/<folder>/<name> for gin/<folder>/<name>.gin (gin/sft/tiny.gin and gin/owt/tiny.gin must not
    share a run), runs/<name> for a gin file elsewhere; under the working directory, where the docs'
    next commands look for it."""
    path = os.path.abspath(resolve_config(config))
    gin_root = os.path.join(REPO_ROOT, "gin") + os.sep
    name = os.path.relpath(path, gin_root) if path.startswith(gin_root) else os.path.basename(path)
    return os.path.join("runs", os.path.splitext(name)[0])


def check_output_dir(args: argparse.Namespace, output_dir: str) -> None:
    """Never train over an earlier run's checkpoints unless asked to (--resume or --overwrite)."""
    from prism.training.checkpoints import list_checkpoints

    if args.command == "train" and not args.resume and list_checkpoints(output_dir) and not args.overwrite:
        raise SystemExit(
            f"{output_dir} already holds checkpoints of an earlier run. Pass --resume to continue it, "
            "--overwrite to delete them and start again, or choose another --output-dir."
        )


def load_run_weights(exp, output_dir: str, accelerator) -> str:
    """For sample / eval: the run's own latest checkpoint if it has one, else
    experiment.init_checkpoint (already loaded), else the random initialisation (with a warning)."""
    from prism.training.checkpoints import load_latest

    ckpt = load_latest(exp.model, output_dir)
    if ckpt:
        accelerator.print(f"loaded weights from {ckpt}")
        return os.path.relpath(ckpt, REPO_ROOT) if ckpt.startswith(REPO_ROOT) else ckpt
    if exp.init_checkpoint:
        return exp.init_checkpoint
    accelerator.print("warning: no checkpoint in the output directory and no experiment.init_checkpoint: "
                      "sampling from randomly initialised weights")
    return "random init"


def check_eval_inputs(exp) -> None:
    """A run that evaluates around training must be able to: check its sampler and evaluation data
    before the first training step rather than after the last."""
    if exp.sampler is None:
        raise SystemExit("run.eval_before_train / run.eval_after_train need experiment.sampler "
                         "(e.g. experiment.sampler = @samplers.mdlm())")
    try:
        first = next(iter(exp.eval_task.eval_batches(1)), None)
    except (OSError, ValueError) as err:
        raise SystemExit(f"run.eval_before_train / run.eval_after_train is set, but the evaluation data cannot be "
                         f"read: {err}\n(checked before training, so no training step was spent)") from None
    if first is None:
        raise SystemExit(f"run.eval_before_train / run.eval_after_train is set, but {type(exp.eval_task).__name__} "
                         "has no evaluation batches")


def results_table(rows: List[dict]) -> str:
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return format_table(rows, columns)


def bound_task(name: str):
    """The task gin binds to ``name`` (e.g. 'experiment.eval_task'), built alone (tasks load their data
    lazily, so this is cheap), or None when nothing is bound."""
    try:
        ref = gin.query_parameter(name)
    except ValueError:
        return None
    return ref.scoped_configurable_fn() if isinstance(ref, gin.config.ConfigurableReference) else ref


def check_data_first(command: str, opts: dict) -> None:
    """Before any model is built: every data file the run's tasks will read is there (else stop with
    the command that fetches it, ``prism.data``), and a scored run may score here (``check_scoring``)."""
    from prism.data import MissingData

    train, evals = bound_task("experiment.task"), bound_task("experiment.eval_task")
    around = opts["eval_before_train"] or opts["eval_after_train"]
    sampled = command != "train" or around
    scored = command == "eval" or (command == "train" and around)
    for task in ([train] if command == "train" else []) + ([evals or train] if sampled else []):
        try:
            if task is not None:
                task.check_data()
        except MissingData as err:
            raise SystemExit(f"{command}: {err}") from None
    if scored and (evals or train) is not None:
        try:  # e.g. MBPP's opt-in to execute generated code, and the sandbox it asks for
            (evals or train).check_scoring()
        except RuntimeError as err:
            raise SystemExit(f"{command}: {err}") from None


def setup(args: argparse.Namespace, opts: dict, run_dir, accelerator):
    """Checks (data, opt-ins: ``check_data_first``) before any model is built, then the experiment with
    its weights and the run's config and run information written; returns (experiment, weights)."""
    from accelerate.utils import set_seed

    from prism.experiment import build_experiment

    try:
        seed = gin.query_parameter("experiment.seed")
    except ValueError:
        seed = 0
    set_seed(seed)  # same seed on every rank: identical initial weights (DDP also broadcasts them)
    check_data_first(args.command, opts)
    exp = build_experiment()
    around = opts["eval_before_train"] or opts["eval_after_train"]  # evaluations around training
    if args.command == "train":
        with accelerator.main_process_first():  # e.g. generate and cache data once, not once per rank
            exp.task.prepare()
            if exp.eval_task is not exp.task and around:
                exp.eval_task.prepare()
        if around:
            check_eval_inputs(exp)  # before the first step, not after the last
        if args.overwrite and not args.resume and accelerator.is_main_process:
            run_dir.clear_training()
        weights = exp.init_checkpoint or "random init"
    else:  # sample / eval read only the evaluation data, each task loading it on first use
        weights = load_run_weights(exp, run_dir.path, accelerator)
    set_seed(seed, device_specific=True)  # from here on (dropout, ...) each rank draws its own numbers
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text_atomic(run_dir.config(args.command), gin.config_str())
        write_text_atomic(run_dir.run_info(args.command), json.dumps(run_info(args, accelerator), indent=2))
    if opts["log_with"]:
        accelerator.init_trackers(opts["project_name"], config={"bindings": args.bind, "configs": args.configs})
    return exp, weights


def run_train(args, opts, exp, weights, accelerator, output_dir):
    """``train`` (with the evaluations around it that ``run`` asks for); returns (result, table rows)."""
    from prism.evaluation.evaluate import generate_and_score
    from prism.training.loop import NonFiniteError, train

    result: dict = {}
    rows: List[dict] = []
    if opts["eval_before_train"]:
        rows.append({"weights": weights, "train steps": 0, **generate_and_score(exp, accelerator, output_dir, tag="_before")})
    try:
        result["train"] = train(exp, accelerator, output_dir, resume=args.resume)
    except NonFiniteError as err:
        raise SystemExit(f"training stopped: {str(err).split(chr(10) + '  In call to configurable')[0]}") from None
    if opts["eval_after_train"]:
        rows.append({"weights": "after training", "train steps": int(result["train"].get("step", 0)),
                     **generate_and_score(exp, accelerator, output_dir)})
    return result, rows


def run_sample_or_eval(args, exp, weights, accelerator, run_dir):
    """``sample`` / ``eval``: one experiment, or one per ``compare.rows`` gin scope; returns (result, rows)."""
    from prism.evaluation.compare import compare_rows
    from prism.evaluation.evaluate import generate_and_score

    result: dict = {}
    rows: List[dict] = []
    compared = compare_rows(accelerator, run_dir.path, score=args.command == "eval")  # one per gin scope
    if compared is not None:
        result["eval"] = {r["row"]: r for r in compared}
        rows += compared
    else:
        result["eval"] = generate_and_score(exp, accelerator, run_dir.path, score=args.command == "eval")
        rows.append({"weights": weights, **result["eval"]})
    if args.command == "eval" and accelerator.is_main_process:
        write_text_atomic(run_dir.eval_metrics, json.dumps(result["eval"], indent=2))
    return result, rows


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    load_builtin_components()
    for d in args.user_dir:
        import_user_dir(d)
    parse_gin(args.configs, args.bind)

    from prism.training.checkpoints import RunDir

    output_dir = args.output_dir or default_output_dir(args.configs[0])
    os.makedirs(output_dir, exist_ok=True)
    opts = run_options()
    args.overwrite = args.overwrite or opts["overwrite"]
    run_dir = RunDir(output_dir)
    check_output_dir(args, output_dir)
    accelerator = make_accelerator(opts, output_dir)
    exp, weights = setup(args, opts, run_dir, accelerator)
    if args.command == "train":
        result, rows = run_train(args, opts, exp, weights, accelerator, output_dir)
    else:
        result, rows = run_sample_or_eval(args, exp, weights, accelerator, run_dir)
    if accelerator.is_main_process:
        if rows and args.command != "sample":
            result["table"] = rows
            table = results_table(rows)
            print("\n" + table)
            write_text_atomic(run_dir.results_table(args.command), table + "\n")
        # The operative config: every parameter actually used by what was built and run.
        write_text_atomic(run_dir.config(args.command, operative=True), gin.operative_config_str())
        write_text_atomic(run_dir.result(args.command), json.dumps(result, indent=2, default=str))
    # Every rank reaches the end before any tears its process group down: a gloo rank that destroys
    # and exits while a peer is still writing can abort at exit (seen in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"\n{args.command} done; everything it wrote is in {os.path.abspath(output_dir)}")
    return result


def console() -> None:
    """The ``prism`` console script: ``prism train|sample|eval CONFIG.gin ...`` as ``python run.py``."""
    main(sys.argv[1:])
