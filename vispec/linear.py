"""Few-row linear layers on the CPU, for the forwards of speculative decoding.

A tree verification pushes ~13 rows per batch row through every linear layer of the target, and a
drafting step a few more through the drafter's. On the CPU, torch's BLAS handles such a call at about
twice the cost of the one-row call that plain decoding makes (its small-M path packs the weights per
call), although the arithmetic of 13 rows would hide under the weight traffic. ``vispec.ops.linear``
reads each weight once per call and computes each row on its own (bit-identical whatever the number of
rows); :func:`few_row_linears` routes a model's ``nn.Linear`` layers to it while decoding.

The routing uses no private hook: inside the context each eligible layer gets an instance ``forward``
(the attribute ``nn.Module.__call__`` calls, as accelerate's hooks set it); leaving it deletes that
attribute again, so the model is exactly as before. Calls the kernel is not for (more rows than
``MAX_ROWS``, another dtype or device, autograd) go to ``F.linear`` as before.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

# Above this many rows torch's BLAS is as fast or faster on the CPUs measured
# (benchmarks/results/cpu-linear-*.md: the crossover sits between 32 and 64 rows).
MAX_ROWS = 32


def _routed(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.dim() > 0
            and x.numel() <= MAX_ROWS * max(x.shape[-1], 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return ops.linear(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


def eligible(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass: quantized or LoRA layers keep their own forward) with fp32
    CPU weights and no instance ``forward`` already (accelerate's hooks, or another router)."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


@contextlib.contextmanager
def few_row_linears(*modules: nn.Module):
    """Inside, every :func:`eligible` linear layer of ``modules`` runs its few-row calls on
    ``vispec.ops.linear``; on exit the layers are as they were. Does nothing where the CPU kernel has no
    vector body (it would be slower than torch's BLAS there)."""
    layers = []
    if ops.cpu_has_avx512():
        seen = set()
        for root in modules:
            for m in root.modules() if isinstance(root, nn.Module) else ():
                if id(m) not in seen and eligible(m):
                    seen.add(id(m))
                    layers.append(m)
    try:
        for m in layers:
            m.forward = functools.partial(_routed, m)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
