"""What the training loop needs to know about how a model is spread over processes.

Four layouts, all through Accelerate: one process or DDP (every rank holds every weight); DeepSpeed
ZeRO-1/2 (weights whole on every rank, optimizer state sharded); FSDP 1 or 2 and DeepSpeed ZeRO-3
(weights sharded). Everything here works on each rank's *local* tensors and exchanges a handful of
scalars, so nothing scales with the model on the wire or in memory (no float32 copy of 8B weights).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn


def layout(accelerator) -> str:
    """'single' | 'ddp' | 'fsdp1' | 'fsdp2' | 'zero1' | 'zero2' | 'zero3'."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind == "FSDP":
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        return f"zero{int(stage)}"
    return "single" if accelerator.num_processes == 1 else "ddp"


WRAPPER_NAMES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter name without the segments that torch.compile, activation checkpointing and FSDP1
    insert (state dicts and ``named_parameters`` disagree about them)."""
    for w in WRAPPER_NAMES:
        name = name.replace(w, "")
    return name


def weights_sharded(accelerator) -> bool:
    return layout(accelerator) in ("fsdp1", "fsdp2", "zero3")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard (FSDP2), ZeRO-3's partition, or the
    tensor itself."""
    if hasattr(t, "to_local"):
        return t.to_local()
    if hasattr(t, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps the partition beside an empty placeholder
        return t.ds_tensor
    return t


PROBE_SLICE = 3 * 2**20  # elements summed at a time by parameter_probe


def trained(model: nn.Module) -> List[torch.Tensor]:
    """The parameters that train (all of them when none does): frozen weights cannot drift apart
    between ranks or turn non-finite during training, and checking 8B of them at every checkpoint
    costs seconds."""
    params = list(model.parameters())
    return [p for p in params if p.requires_grad] or params


@torch.no_grad()
def parameter_probe(params: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Two float32 sums per parameter (all elements; every third element), each reduced on the
    parameter's own device without an upcast copy. Equal weights give equal probes; a rank whose
    gradients were not all-reduced differs in practically every sum; any NaN or inf poisons its sum."""
    sums = []
    for p in params:
        flat = local(p).detach().reshape(-1)  # local() first: detach() drops ZeRO-3's ds_tensor
        if flat.numel() == 0:
            continue
        # in slices: a sum with dtype= widens its whole input first (an 8B model's bf16 output layer
        # would make a 2 GB float32 copy); slices a multiple of 3 long keep flat[::3]'s elements
        parts = [torch.stack([torch.sum(c, dtype=torch.float32), torch.sum(c[::3], dtype=torch.float32)])
                 for c in flat.split(PROBE_SLICE)]
        sums.append(torch.stack(parts).sum(0))
    if not sums:
        return torch.zeros(0, device=device)
    return torch.cat([s.to(device) for s in sums])


def ranks_in_sync(accelerator, model: nn.Module) -> Optional[bool]:
    """True when every process holds the same trained weights (DDP really synchronised gradients); None where
    the weights are sharded and ranks hold different parts by design."""
    if weights_sharded(accelerator):
        return None
    probe = parameter_probe(trained(model), accelerator.device)
    gathered = accelerator.gather(probe[None])
    return bool(torch.equal(gathered, gathered[:1].expand_as(gathered)))


def all_finite(accelerator, model: nn.Module) -> bool:
    """Whether every trained weight on every rank is finite (sharded weights included): one scalar
    all-reduced."""
    bad = (~torch.isfinite(parameter_probe(trained(model), accelerator.device))).sum().float()
    return float(accelerator.reduce(bad.reshape(1), "sum").item()) == 0.0


def as_scalar(value, device: torch.device) -> Optional[torch.Tensor]:
    """A gradient norm as Accelerate returns it under each layout (a tensor, a DTensor, a Python
    float, or None under DeepSpeed before its first step) as a 0-d float32 tensor, or None."""
    if value is None:
        return None
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(()).to(device)
    return torch.tensor(float(value), dtype=torch.float32, device=device)


class EMA:
    """Exponential moving average of the trained parameters, θ_ema ← d_n·θ_ema + (1 − d_n)·θ, with
    the usual warm-up d_n = min(decay, (1 + n) / (10 + n)) after n updates, so that early checkpoints
    are not dominated by the random initialisation (with d = 0.999 a plain EMA still holds 78% of it
    after 250 steps).

    The shadow is float32 and lives beside each parameter: whole under DDP, one shard per rank under
    FSDP2 (DTensors, so the average is sharded like the model). FSDP1 and ZeRO-3 hide the parameters
    behind flat buffers; ``supported`` says so and the loop refuses them with a clear message."""

    FILE = "ema_rank{rank:05d}.pt"

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {canonical_name(k): p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @staticmethod
    def supported(accelerator) -> bool:
        return layout(accelerator) not in ("fsdp1", "zero3")

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, p in model.named_parameters():
            k = canonical_name(k)
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averages into the model's parameters in place (shard by shard when sharded)."""
        for k, p in model.named_parameters():
            k = canonical_name(k)
            if k in self.shadow:
                p.detach().copy_(self.shadow[k].to(p.dtype))

    def weights(self, state: Dict[str, torch.Tensor], aliases: Optional[Dict[str, str]] = None,
                shadow: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """A full state dict with the averages in place of the trained parameters; a tied name takes
        the average of the tensor it shares (``aliases``: name → canonical name). ``shadow``: the
        gathered averages (``full_shadow()``, collective under FSDP2); default: this rank's."""
        shadow = self.shadow if shadow is None else shadow
        aliases = aliases or {}
        out, used = {}, set()
        for k, v in state.items():
            src = canonical_name(aliases.get(k, k))
            if src in shadow:
                out[k] = shadow[src].to(device=v.device, dtype=v.dtype)
                used.add(src)
            else:
                out[k] = v
        if set(shadow) - used:  # an average that finds no weight would silently ship the raw weights
            raise KeyError(f"EMA averages without a weight in the state dict: {sorted(set(shadow) - used)[:5]}")
        return out

    def full_shadow(self, accelerator) -> Optional[Dict[str, torch.Tensor]]:
        """The whole averages, on the main process's CPU (None elsewhere). Collective under FSDP2
        (call it on every rank): one parameter is whole at a time, and only the main process keeps it."""
        out = {}
        for k, v in self.shadow.items():
            whole = v.full_tensor() if hasattr(v, "full_tensor") else v
            if accelerator.is_main_process:
                out[k] = whole.cpu()
            del whole
        return out if accelerator.is_main_process else None

    def save(self, directory: str, accelerator) -> None:
        """Each rank writes its own shards (only the main process when the averages are whole)."""
        if weights_sharded(accelerator) or accelerator.is_main_process:
            rank = accelerator.process_index if weights_sharded(accelerator) else 0
            state = {"decay": self.decay, "updates": self.updates, "world_size": accelerator.num_processes, "sharded": weights_sharded(accelerator),
                     "shadow": {k: local(v).cpu() for k, v in self.shadow.items()}}
            torch.save(state, os.path.join(directory, self.FILE.format(rank=rank)))

    def load(self, directory: str, accelerator) -> None:
        sharded = weights_sharded(accelerator)
        path = os.path.join(directory, self.FILE.format(rank=accelerator.process_index if sharded else 0))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written without an EMA or by another number of "
                "processes. Resume with the same train.ema_decay and process count, or start a new run.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("sharded", False) != sharded:
            raise ValueError(f"the EMA in {directory} was saved {'sharded' if state.get('sharded') else 'whole'}, but this run's "
                             f"weights are {'sharded' if sharded else 'whole'} ({layout(accelerator)}): resume under the layout it was written with")
        if sharded and state["world_size"] != accelerator.num_processes:
            raise ValueError(f"the EMA in {directory} is sharded over {state['world_size']} processes; "
                             f"resume it with {state['world_size']}, not {accelerator.num_processes}")
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["shadow"].items():
            local(self.shadow[k]).copy_(v)


def mixed_precision_choice(gin_value: Optional[str]) -> str:
    """``run.mixed_precision`` where the gin configuration sets it, else the launcher's choice
    (``accelerate launch`` passes its config's ``mixed_precision`` as ACCELERATE_MIXED_PRECISION), else
    'no'. Accelerate lets an explicit argument override the launcher silently; a gin value that
    overrides a launcher's mixed precision is announced instead."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if gin_value is None:
        return launcher or "no"
    if launcher not in (None, "no", gin_value) and os.environ.get("RANK", "0") == "0":
        print(f"run.mixed_precision = {gin_value!r} overrides the launcher's mixed_precision = {launcher!r} "
              "(bind run.mixed_precision = None to follow the launcher)", file=sys.stderr, flush=True)
    return gin_value


def make_accelerator(opts: dict, output_dir: str):
    """The process-level Accelerator from ``run.*`` options: CPU mode (gloo) where there is no CUDA or
    ACCELERATE_USE_CPU is set, at most one process per visible GPU, the launcher's mixed precision
    unless gin sets one, FSDP2 on CPU processes under an FSDP2 accelerate config or PRISM_CPU_FSDP=1."""
    from accelerate import Accelerator

    # On a machine without CUDA, Accelerate must be told to use the CPU for DDP (gloo); without it,
    # torchrun ranks would silently train on their own.
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not cpu:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            raise SystemExit(
                f"{local_world} processes per machine were asked for, but this machine has "
                f"{torch.cuda.device_count()} visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
                "Launch at most one process per GPU (--nproc_per_node / --num_processes), or run on the CPU "
                "with ACCELERATE_USE_CPU=true (gloo).")
    # step_scheduler_with_optimizer=False: otherwise Accelerate advances a prepared scheduler once per
    # process at every optimizer step (warm-up N times too short, cosine past its end on N processes).
    kwargs = []
    if opts.get("find_unused_parameters"):
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP; on CPU processes Accelerate
    # would quietly fall back to DDP, so the sharded layout asked for is set up below instead.
    launcher_fsdp = cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    if launcher_fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise SystemExit("the accelerate config asks for FSDP version 1, which runs only on GPUs here; on CPU "
                         "processes use fsdp_version: 2 (accelerate_configs/fsdp2.yaml)")
    precision = mixed_precision_choice(opts.get("mixed_precision"))
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=opts["log_with"], project_dir=output_dir,
                              step_scheduler_with_optimizer=False, kwargs_handlers=kwargs)
    if cpu and (launcher_fsdp or os.environ.get("PRISM_CPU_FSDP", "").lower() in ("1", "true", "yes")):
        cpu_fsdp2(accelerator, from_launcher=launcher_fsdp)
    return accelerator


def cpu_fsdp2(accelerator, from_launcher: bool = False) -> None:
    """FSDP2 over gloo on CPU processes, for tests and for trying a sharded run without GPUs.
    Accelerate only offers FSDP on accelerators, although torch's ``fully_shard`` runs on CPU; this
    switches the state of an Accelerator built with ``cpu=True`` before anything is prepared. Under
    ``accelerate launch`` the plugin reads the config's FSDP_* settings (wrap class, resharding)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if accelerator.num_processes < 2:
        raise SystemExit("FSDP on CPU processes needs at least 2 of them (torchrun --nproc_per_node 2, "
                         "accelerate launch --num_processes 2)")
    plugin = FullyShardedDataParallelPlugin() if from_launcher else FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
    for state in (AcceleratorState(), PartialState()):
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
