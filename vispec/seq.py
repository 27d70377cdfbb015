"""Sequence layout helpers shared by the engine, the drafters and training (padding, blocks, EOS ids)."""
from __future__ import annotations

import torch


def eos_list(eos_token_id) -> list[int]:
    """EOS ids as a list, from an int, a list or a tensor (None: no EOS)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    if isinstance(eos_token_id, torch.Tensor):
        return [int(x) for x in eos_token_id.flatten().tolist()]
    return [int(x) for x in eos_token_id]


def image_blocks(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) inclusive of each run of True in a 1-D bool tensor."""
    m = mask.to(torch.int8)
    edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = (torch.nonzero(edges == -1).flatten() - 1).tolist()
    return list(zip(starts, ends))


def compact(x: torch.Tensor, take: torch.Tensor):
    """Left-aligns the positions where ``take`` holds: (x (B, T, H), original positions (B, T), counts (B,))."""
    b, p = take.shape
    counts = take.sum(1)
    order = torch.sort((~take).to(torch.int8), dim=1, stable=True).indices  # kept positions first, in order
    t = max(int(counts.max()), 1)
    idx = order[:, :t]
    xs = torch.gather(x, 1, idx.unsqueeze(-1).expand(b, t, x.shape[-1]))
    return xs, idx, counts


def left_align(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of x (B, P, ...) shifted left by shift[b] (the freed tail holds junk)."""
    b, p = x.shape[:2]
    idx = (torch.arange(p, device=x.device).unsqueeze(0) + shift.unsqueeze(1)).clamp(max=p - 1)
    idx = idx.view(b, p, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


def to_left_padding(attention_mask: torch.Tensor, tensors: dict) -> tuple[torch.Tensor, dict]:
    """Right- or mixed-padded prompts become left-padded (each row's tokens moved as one block)."""
    b, p = attention_mask.shape
    m = attention_mask.bool()
    n = m.sum(1)
    if bool((n == 0).any()):
        raise ValueError(f"row {int((n == 0).nonzero()[0])} of attention_mask holds no token")
    first = torch.argmax(m.int(), 1)
    last = p - 1 - torch.argmax(m.flip(1).int(), 1)
    if bool((last - first + 1 != n).any()):
        raise ValueError("attention_mask must mark one contiguous block of real tokens per row (padding on the sides)")
    # New column j takes old column j + first - (P - n): the block ends at column P-1.
    idx = (torch.arange(p, device=n.device).unsqueeze(0) + (first - (p - n)).unsqueeze(1)) % p
    out = {k: torch.gather(v, 1, idx.view(b, p, *([1] * (v.dim() - 2))).expand_as(v)) for k, v in tensors.items()}
    new_mask = (torch.arange(p, device=n.device).unsqueeze(0) >= (p - n).unsqueeze(1)).to(attention_mask.dtype)
    return new_mask, out
