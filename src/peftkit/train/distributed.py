"""Data-parallel training under ``torchrun``: DDP or FSDP2 set-up, and the collective parts of checkpoints.

DDP replicates the model and all-reduces the gradients of the trainable (adapter) tensors only. FSDP2
shards every parameter, frozen base weights included (the memory saving), block by block; the adapter
trains exactly as under DDP. Checkpoints of either are written by rank 0 alone, but under FSDP gathering
the sharded adapter and optimizer state is a collective every rank joins, so a checkpoint holds full
(unsharded) tensors keyed by parameter name and resumes on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def init_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def wrap_ddp(model: nn.Module, params: list[torch.Tensor], world: int, counter: Any) -> nn.Module:
    """``model`` under DDP with a comm hook that counts the all-reduced elements into ``counter.comm_numel``.

    Every rank builds the same model from the same seed; only the trainable tensors are broadcast from
    rank 0 to be sure, instead of DDP's initial broadcast of every parameter."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    for p in params:
        dist.broadcast(p.data, src=0)
    device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    wrapped = DDP(model, device_ids=device, init_sync=False, forward_sync_buffers=False)

    def counting_allreduce(state: Any, bucket: Any) -> torch.futures.Future:
        tensor = bucket.buffer()
        counter.comm_numel += tensor.numel()
        tensor.div_(world)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    # DDP checks the hook's annotations as objects (this module's are strings under PEP 563)
    counting_allreduce.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                          "return": torch.futures.Future[torch.Tensor]}
    wrapped.register_comm_hook(None, counting_allreduce)
    return wrapped


def shard_fsdp(model: nn.Module, base: nn.Module) -> None:
    """FSDP2: each repeated block of ``base``, then the whole ``model``; gradients are reduce-scattered."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(base):
        fully_shard(block)
    fully_shard(model)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the children of its longest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return list(max(lists, key=len)) if lists else []


def mean_across_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def gather_objects(obj: Any, world: int) -> list[Any]:
    """``obj`` from every rank (in memory, over the process group), e.g. each rank's RNG state."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective (FSDP): the trainable tensors and the optimizer state, unsharded, keyed by parameter name.

    Every rank must call it; the tensors are complete on every rank (adapters are small)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    trainable = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            trainable[name] = full.detach().cpu().clone()
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return {"trainable": trainable, "optimizer": _to_cpu(optim)}


def load_full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank: put ``full_training_state``'s tensors back into the sharded parameters and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != names:
        missing = sorted(names - set(state["trainable"])) or sorted(set(state["trainable"]) - names)
        raise ValueError(f"resume: the checkpoint's trainable tensors do not match the model's (first: {missing[0]})")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["trainable"], options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
