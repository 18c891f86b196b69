"""Data-parallel and sharded training on PyTorch's own engine: the trainer's view of torchrun.

Every process of a ``torchrun`` launch runs the same stage. This module holds what the trainer
and the stages need to agree across processes:

- who this process is (:func:`distributed_env`) and the process group (NCCL on CUDA, gloo on CPU);
- reductions the loop needs (:func:`gather_objects`, :func:`all_max`, :func:`reduce_windows`) and
  rank 0's decisions (:func:`from_main`);
- how the model is wrapped: DDP (gradients all-reduced) or FSDP2 (``fully_shard`` per transformer
  block, then the whole model: parameters, gradients and optimizer state sharded, bf16 compute
  with fp32 gradient reduction on CUDA);
- the sharded checkpoint of an FSDP run (``torch.distributed.checkpoint``), which a run on any
  other number of processes, sharded or not, can load, and a plain checkpoint loaded into a
  sharded model;
- :func:`unsharded_gpt`: a plain copy of a sharded language model for the KV-cache engine.

Data is split by a rule the stages share: the global stream of micro-batches is the one a single
process would draw, and process ``r`` of ``W`` trains on micro-batches ``r, r + W, r + 2W, ...``.
So N processes with grad_accum G train on exactly the batches of one process with grad_accum N*G.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_env() -> DistInfo:
    """Rank information from torchrun's environment (1 process when not launched by it)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(info: DistInfo, device: torch.device, sharded: bool) -> None:
    """Join torchrun's process group; a single sharded process gets a group of its own (FSDP
    needs one) kept in memory, so no rendezvous address is needed."""
    if dist.is_initialized() or (info.world_size == 1 and not sharded):
        return
    # before any collective: NCCL binds each process to its current GPU (plain "cuda": already the current one)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)


def active() -> bool:
    """Whether collectives are needed: a process group of more than one process."""
    return dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (a decision rank 0 takes for all)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_max(value: float) -> float:
    """The largest ``value`` over all processes (a decision every process must take alike)."""
    if not active():
        return value
    return max(gather_objects(value))


def reduce_windows(sums: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Sum per-metric sums and counts over processes: a logged mean covers every process's steps
    (a metric some process did not report is averaged over the ones that did)."""
    total_sums: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    for s, c in gather_objects((sums, counts)):
        for k, v in s.items():
            total_sums[k] = total_sums.get(k, 0.0) + v
            total_counts[k] = total_counts.get(k, 0) + c[k]
    return total_sums, total_counts


# ------------------------------------------------------------------------- wrapping
def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every transformer block (of the policy and of a value
    model alike); the rest (embeddings, final norm, heads) belongs to the root."""
    from .model import Block
    return [m for m in model.modules() if isinstance(m, Block)]


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: each block, then the root. On CUDA parameters are gathered in bf16 and
    gradients reduced in fp32; on a CPU (gloo, tests) everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for unit in sharded_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    # gradients as views of DDP's buckets: no second fp32 copy of every gradient
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of a micro-batch that is not the step's last (DDP). FSDP
    reduce-scatters every micro-batch: its gradients are sharded, so keeping them unreduced would
    cost a whole unsharded copy."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def full_value(t: Any) -> Any:
    """A sharded tensor (DTensor) as the whole tensor on every process; anything else as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def unsharded_gpt(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a model with sharded parameters a plain copy with the whole
    weights on this process (gathered one parameter at a time), for generation: the KV-cache
    engine calls the model's parts directly, which sharded parameters cannot serve. The copy
    costs the model's weights once more per process while it lives: 2 bytes per parameter on
    CUDA (bf16, as generation computes), 4 on a CPU."""
    from torch.distributed.tensor import DTensor
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    state = {}
    for name, value in model.state_dict().items():
        value = full_value(value).detach()
        state[name] = value.to(torch.bfloat16) if value.is_cuda and value.is_floating_point() else value
    with torch.device("meta"):  # no initialisation of weights that are about to be replaced
        copy = type(model)(model.config)  # type: ignore[call-arg]
    copy.load_state_dict(state, assign=True)
    if getattr(model.config, "tie_embeddings", False):
        copy.lm_head.weight = copy.wte.weight
    for name, buffer in model.named_buffers():  # RoPE tables are not part of the state dict
        owner, _, attr = name.rpartition(".")
        setattr(copy.get_submodule(owner), attr, buffer)
    return copy.train(model.training)


# ----------------------------------------------------------------- sharded checkpoints
SHARDED_DIR = "checkpoint.shards"  # next to checkpoint.pt: one folder per saved step


def shard_folder(out_dir: Path, step: int) -> Path:
    return out_dir / SHARDED_DIR / f"step-{step:08d}"


def save_sharded(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Every process writes its shards of the model and optimizer state to a new step folder;
    returns its name relative to ``out_dir`` (recorded in checkpoint.pt, whose atomic rename
    makes it the one to resume: :func:`remove_other_shards` then deletes older folders)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = shard_folder(out_dir, step)
    if dist.get_rank() == 0 and folder.exists():  # a save of this step that was cut short
        shutil.rmtree(folder)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    return str(folder.relative_to(out_dir))


def remove_other_shards(out_dir: Path, keep: str) -> None:
    root = out_dir / SHARDED_DIR
    for folder in root.iterdir() if root.exists() else ():
        if folder != out_dir / keep:
            shutil.rmtree(folder, ignore_errors=True)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint written by any number of processes into ``model`` and
    ``optimizer``, sharded over this run's processes or not sharded at all (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_whole(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any]) -> None:
    """Load a plain checkpoint (the whole model, a plain optimizer state) into a sharded model and
    its optimizer: every process reads it whole and keeps its shards. The plain state numbers
    parameters in the optimizer's order, the same for the sharded model; they become names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=named,
                   options=StateDictOptions(full_state_dict=True))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU, gathered one parameter at a time (every process
    takes part; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (files rank 0 creates, the rest read)."""
    if not info.is_main and active():
        dist.barrier()
    yield
    if info.is_main and active():
        dist.barrier()
