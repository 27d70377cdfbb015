"""Python API of vispec's custom ops (registered as ``torch.ops.vispec.*``).

Tree convention shared by every op: node 0 is the root (the last accepted
token, not yet in the target's cache); ``parents[b, i] < i`` is node i's parent
(-1 for the root); the N tree tokens' K/V sit at cache positions
``cache_lens[b] .. cache_lens[b] + N - 1``. ``accept_path`` lists the accepted
node indices starting with 0, padded with -1; ``accept_len`` counts accepted
draft nodes (the root excluded).

Shape, dtype and device errors are raised by the C++ side before any work; on
CPU the index ranges are checked too. CUDA kernels stay in bounds on any input
but do not check values (that would cost a host sync); call
:func:`check_tree` to check them explicitly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.vispec.*)

__all__ = [
    "tree_attention",
    "verify_greedy",
    "verify_sampling",
    "chain_speculative_sampling",
    "compact_kv_",
    "linear",
    "pack_tree_mask",
    "tree_mask_from_parents",
    "check_tree",
    "cuda_built",
    "cpu_has_avx512",
]


def cpu_has_avx512() -> bool:
    """Whether the CPU kernels run their AVX-512 bodies here (``VISPEC_NO_AVX512=1`` forces the portable ones)."""
    return bool(_C.cpu_has_avx512())


def cuda_built() -> bool:
    """Whether the installed extension contains the CUDA kernels."""
    return bool(_C.cuda_built())


# ---------------------------------------------------------------------------
# Tree masks
# ---------------------------------------------------------------------------
def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask ``(..., N, N)`` into int32 words ``(..., N, ceil(N/32))``.

    Bit ``j % 32`` of word ``j // 32`` in row i is set iff node i attends to node j.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_tree_mask: mask must be bool, got {mask.dtype}")
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"pack_tree_mask: mask must have shape (..., N, N), got {tuple(mask.shape)}")
    n = mask.shape[-1]
    words = (n + 31) // 32
    padded = torch.nn.functional.pad(mask, (0, words * 32 - n)).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    packed = (padded.reshape(*mask.shape[:-1], words, 32) * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement into int32
    return packed.to(torch.int32).contiguous()


def tree_mask_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask ``(B, N, N)`` bool from ``parents`` ``(B, N)``.

    Vectorised pointer doubling: log2(N) steps on the device, no host sync.
    """
    if parents.dim() != 2:
        raise ValueError(f"tree_mask_from_parents: parents must have shape (B, N), got {tuple(parents.shape)}")
    b, n = parents.shape
    eye = torch.eye(n, dtype=torch.bool, device=parents.device).expand(b, n, n)
    par = parents.clamp(min=0)
    # has_parent[b, i, p] = p is node i's parent (the root has none)
    direct = torch.zeros(b, n, n, dtype=torch.bool, device=parents.device)
    direct.scatter_(2, par.unsqueeze(-1), (parents >= 0).unsqueeze(-1))
    reach = eye | direct
    steps = max(1, (n - 1).bit_length())
    for _ in range(steps):  # reach <- reach o reach doubles the path length covered
        reach = reach | (reach.float() @ reach.float()).bool()
    return reach


def check_tree(draft_tokens: torch.Tensor, parents: torch.Tensor, vocab: int) -> None:
    """Raises ValueError naming the bad entry if ``parents`` is not a valid tree or a token is out of range."""
    if parents.shape != draft_tokens.shape or parents.dim() != 2:
        raise ValueError(
            f"draft_tokens {tuple(draft_tokens.shape)} and parents {tuple(parents.shape)} must both be (B, N)"
        )
    p = parents.detach().cpu()
    t = draft_tokens.detach().cpu()
    n = p.shape[1]
    bad_root = (p[:, 0] != -1).nonzero()
    if len(bad_root):
        b = int(bad_root[0])
        raise ValueError(f"parents[{b}, 0] must be -1 (node 0 is the root), got {int(p[b, 0])}")
    idx = torch.arange(n).expand_as(p)
    bad = ((p < 0) | (p >= idx))[:, 1:].nonzero()
    if len(bad):
        b, i = int(bad[0, 0]), int(bad[0, 1]) + 1
        raise ValueError(f"parents[{b}, {i}]={int(p[b, i])} is invalid: need 0 <= parent < {i}")
    bad = ((t < 0) | (t >= vocab)).nonzero()
    if len(bad):
        b, i = int(bad[0, 0]), int(bad[0, 1])
        raise ValueError(f"draft_tokens[{b}, {i}]={int(t[b, i])} is outside the vocabulary [0, {vocab})")


# ---------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    window: int = 0,
):
    """Attention of the N tree queries over a prefix plus the tree itself.

    q ``(B, N, Hq, D)``; k_cache, v_cache ``(B, Hkv, S_max, D)`` already holding the
    tree tokens' K/V at ``cache_lens[b] ..``; cache_lens ``(B,)`` int64;
    tree_mask bool ``(B or 1, N, N)`` / ``(N, N)``, or packed int32 from
    :func:`pack_tree_mask`. Returns out ``(B, N, Hq, D)`` (and lse ``(B, N, Hq)``
    fp32, natural log, if ``return_lse``). ``window > 0`` is sliding-window attention: a node at
    position ``cache_lens[b] + depth`` (its depth = bits in its mask row - 1) sees prefix keys ``k``
    with ``position - k < window`` (transformers' rule); it must be 0 or at least N.
    """
    if tree_mask.dtype == torch.bool:
        if tree_mask.dim() == 2:
            tree_mask = tree_mask.unsqueeze(0)
        tree_mask = pack_tree_mask(tree_mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = torch.ops.vispec.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, float(scale), return_lse,
                                               int(window or 0))
    return (out, lse) if return_lse else out


def _max_accept(max_accept: int | None, n: int) -> int:
    return n - 1 if max_accept is None else int(max_accept)


def verify_greedy(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    max_accept: int | None = None,
):
    """Greedy verification: follow the tree while a child's token equals the target's argmax.

    target_logits ``(B, N, V)``: the target's logits at every tree node.
    ``max_accept`` caps accepted draft tokens (default N-1; pass the tree depth to get
    ``accept_path`` of width depth+1). Returns ``(accept_path (B, max_accept+1),
    accept_len (B,), bonus_token (B,))``, all int64.
    """
    return torch.ops.vispec.verify_greedy(
        target_logits, draft_tokens, parents, _max_accept(max_accept, target_logits.shape[1])
    )


def _uniforms(shape, device, seed, generator, uniforms):
    """The fresh uniforms of a sampling op: one per decision, never shared by two."""
    if uniforms is not None:
        return uniforms
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)


def verify_sampling(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    max_accept: int | None = None,
    uniforms: torch.Tensor | None = None,
):
    """Lossless multi-round rejection sampling over a tree of deterministic (top-k) drafts.

    The target distribution is processed as ``model.generate`` does it: logits /
    temperature, then top-k (ties kept), then top-p. Siblings are tested in index
    order; child x is accepted with probability p(x) / remaining mass, a rejected
    token's probability is zeroed and the rest renormalised; the bonus token comes
    from the residual. ``uniforms`` ``(B, N)`` float64 in [0, 1) may be given
    explicitly (slot j tests node j, slot 0 draws the bonus); otherwise they are drawn
    from ``generator`` or a generator seeded with ``seed``.
    """
    b, n, _ = target_logits.shape
    u = _uniforms((b, n), target_logits.device, seed, generator, uniforms)
    return torch.ops.vispec.verify_sampling(
        target_logits,
        draft_tokens,
        parents,
        u,
        float(temperature),
        0 if top_k is None else int(top_k),
        1.0 if top_p is None else float(top_p),
        _max_accept(max_accept, n),
    )


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
):
    """Speculative sampling of a chain of K stochastic drafts (accept with min(1, p/q)).

    draft_probs ``(B, K, V)``, draft_tokens ``(B, K)``, target_probs ``(B, K+1, V)``.
    Returns ``(tokens (B, K+1) -1 padded, accept_len (B,))``.
    """
    b, k, _ = draft_probs.shape
    u = _uniforms((b, k + 1), draft_probs.device, seed, generator, uniforms)
    return torch.ops.vispec.chain_speculative_sampling(draft_probs, draft_tokens, target_probs, u)


def compact_kv_(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    cache_lens: torch.Tensor,
    accept_path: torch.Tensor,
    accept_len: torch.Tensor,
    update_lens: bool = False,
) -> torch.Tensor:
    """Moves the accepted nodes' K/V next to the prefix, in place, for all layers at once.

    Per row b and 0 < i <= accept_len[b]: position ``cache_lens[b] + i`` takes the
    entry at ``cache_lens[b] + accept_path[b, i]``. Returns the new lengths
    ``cache_lens + accept_len + 1`` (written into ``cache_lens`` if ``update_lens``).
    """
    torch.ops.vispec.compact_kv_(list(k_caches), list(v_caches), cache_lens, accept_path, accept_len)
    new_lens = cache_lens + accept_len + 1
    if update_lens:
        cache_lens.copy_(new_lens)
        return cache_lens
    return new_lens


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors, built for few rows (a tree verification's).

    x ``(..., K)``; weight ``(N, K)``; bias ``(N,)`` or None. Each row's output depends on that row
    alone, in a fixed order of operations: it is bit-identical whatever the number of rows it is computed
    with. Rounding differs from torch's BLAS (a few ulps of fp32).
    """
    if x.dim() == 0:
        raise ValueError("linear: x must have at least one dimension (..., K)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 0 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.vispec.linear(x2, weight, bias)
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------------------
# Fake (meta) implementations, so torch.compile(fullgraph=True) traces the ops
# ---------------------------------------------------------------------------
@torch.library.register_fake("vispec::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_lens, tree_mask, scale, return_lse, window=0):
    lse_shape = (q.shape[0], q.shape[1], q.shape[2]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)  # out is contiguous whatever q's strides


def _verify_fake(target_logits, draft_tokens, max_accept):
    b = target_logits.shape[0]
    return (
        draft_tokens.new_empty((b, max_accept + 1)),
        draft_tokens.new_empty((b,)),
        draft_tokens.new_empty((b,)),
    )


@torch.library.register_fake("vispec::verify_greedy")
def _verify_greedy_fake(target_logits, draft_tokens, parents, max_accept):
    return _verify_fake(target_logits, draft_tokens, max_accept)


@torch.library.register_fake("vispec::verify_sampling")
def _verify_sampling_fake(target_logits, draft_tokens, parents, uniforms, temperature, top_k, top_p, max_accept):
    return _verify_fake(target_logits, draft_tokens, max_accept)


@torch.library.register_fake("vispec::chain_speculative_sampling")
def _chain_fake(draft_probs, draft_tokens, target_probs, uniforms):
    b, k = draft_tokens.shape
    return draft_tokens.new_empty((b, k + 1)), draft_tokens.new_empty((b,))


@torch.library.register_fake("vispec::linear")
def _linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("vispec::compact_kv_")
def _compact_kv_fake(k_caches, v_caches, cache_lens, accept_path, accept_len):
    return None
