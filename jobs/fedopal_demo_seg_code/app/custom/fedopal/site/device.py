"""Where a site's model runs: the device (`train.device`), the autocast precision (`train.precision`), and moving
things between the device and the CPU.

Weights, optimizer state and every tensor that leaves a site or is saved stay float32 on the CPU; only forward
passes run in the autocast dtype (torch.autocast: bf16 on the CPU too, fp16 with a gradient scaler).
"""

from __future__ import annotations

import copy
import itertools
import os

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine cannot give; the message names the config key and the fix."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`train.device` -> a torch.device.

    auto: cuda:<local rank> (cuda:0 in a single process) when torch sees a CUDA GPU, else the CPU. cuda: the same
    GPU, but a machine without one is an error. cuda:N: that GPU (single-process sites).
    Raises DeviceError (one line) where CUDA is asked for and torch has none, or the index does not exist."""
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto" and not available:
        return torch.device("cpu")
    if not available:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"train.device is '{name}' but torch {torch.__version__} ({build}) sees no CUDA GPU on this "
                          "machine. Fix: set train.device: auto (or cpu), or install a CUDA build of torch (README, "
                          "GPU).")
    index = int(name.split(":", 1)[1]) if ":" in name else (local_rank or 0)
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DeviceError(f"train.device asks for cuda:{index} but this process sees {count} GPU(s){seen}. "
                          f"Fix: set train.device: cuda:0..cuda:{count - 1}, or auto.")
    return torch.device("cuda", index)


def check_precision(device: torch.device, precision: str) -> None:
    """bf16 on a GPU needs hardware support (Ampere or newer); fp16/bf16 autocast on the CPU is torch's."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"train.precision is bf16 but {torch.cuda.get_device_name(device)} has no bf16 support. "
                          "Fix: set train.precision: fp16 (or fp32).")


def describe(device: torch.device, precision: str, threads: int | None = None) -> str:
    """One line for the site log, e.g. 'cuda:0 NVIDIA A100 80GB PCIe, bf16' or 'cpu (1 thread), fp32'."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{device} {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        n = threads or torch.get_num_threads()
        where = f"cpu ({n} thread{'s' if n != 1 else ''})"
    return f"{where}, {precision}"


def autocast(device: torch.device, precision: str):
    """The forward-pass context of `train.precision` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                          enabled=precision in AUTOCAST_DTYPES)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its small range underflows LoRA gradients); disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch on the device; non_blocking pairs with pinned memory (data.loader pins on CUDA)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def module_device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def cpu_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose tensors are on the CPU, built without a second copy on the GPU (the merged
    export of a model training on a GPU). deepcopy consults `memo` by object id, so every parameter and buffer is
    copied straight to the CPU."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "cpu":
            data = tensor.detach().to("cpu", copy=True)
            memo[id(tensor)] = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
    return copy.deepcopy(module, memo)
