"""A site with several processes (`train.nproc_per_site` > 1): one model trained with torch DDP.

FLARE's Client API external-process launcher starts the site script under torchrun (`job.py` sets the command:
`python3 -u -m torch.distributed.run --standalone --nproc_per_node N`). Rank 0 is the only process that talks to
FLARE (the Client API is passive on other ranks), validates the data, evaluates, and writes the personal state, the
metrics and the exports. Every rank trains on its part of each batch (data.ShardedBatches); DDP averages the
gradients, so all ranks hold the same weights after every step. Rank 0 hands the other ranks what it received
(`broadcast`): the site name once, the resumed personal state once, and each round's global tensors.

Backends: NCCL on CUDA GPUs (one GPU per process: cuda:<local rank>), gloo on the CPU (tests, and sites without GPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


# Between rounds the other ranks wait in a broadcast while rank 0 evaluates, exports and FLARE waits for the other
# sites: far longer than torch's default collective timeout (10 min for gloo, NCCL's watchdog likewise). A rank that
# dies is noticed by torchrun at once, so a long timeout only delays noticing a hang.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_name: str) -> DistContext | None:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment);
    None in a single process. NCCL when this process will train on a GPU, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # NCCL's collectives (and broadcast_object_list) use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def broadcast(obj, ctx: DistContext | None):
    """Rank 0's `obj` on every rank (pickled; for a round's LoRA tensors that is a few MB). Identity in a single
    process. Tensors arrive as they were sent (CPU tensors)."""
    if ctx is None:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of each value over the ranks (gloo on the CPU, NCCL on the GPU)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over the model's trainable tensors. A frozen backbone runs in eval mode with fixed buffers, so they are not
    re-broadcast every step; a trained one (full_ft) takes rank 0's BatchNorm statistics."""
    frozen = getattr(model, "backbone_frozen", False)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=not frozen)


def shutdown(ctx: DistContext | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
