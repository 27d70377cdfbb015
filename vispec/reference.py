"""Pure-PyTorch references of vispec's ops: slow, obvious, used by the tests and benchmarks.

They follow the same conventions as :mod:`vispec.ops` and consume the same
explicit uniforms, so on equal inputs the kernels must produce the same tokens.
"""
from __future__ import annotations

import torch


def tree_attention_ref(q, k_cache, v_cache, cache_lens, tree_mask, scale=None, window=0):
    """out (B, N, Hq, D) in q's dtype and lse (B, N, Hq) fp32; tree_mask bool (B or 1, N, N).
    window > 0: node i (at position cache_len + depth_i) sees prefix keys k with position - k < window."""
    b, n, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    g = hq // hkv
    k = k_cache.float().repeat_interleave(g, dim=1)  # (B, Hq, S, D)
    v = v_cache.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("bnhd,bhsd->bhns", q.float() * scale, k)  # (B, Hq, N, S)
    pos = torch.arange(s_max, device=q.device)
    lens = cache_lens.view(b, 1, 1)
    mask = tree_mask.expand(b, n, n)
    rel = (pos.view(1, 1, s_max) - lens).clamp(0, n - 1)  # tree node of a key position
    in_tree = (pos.view(1, 1, s_max) >= lens) & (pos.view(1, 1, s_max) < lens + n)
    tree_vis = torch.gather(mask, 2, rel.expand(b, n, s_max))
    prefix = pos.view(1, 1, s_max) < lens
    if window:
        depth = mask.sum(-1, keepdim=True) - 1  # (B, N, 1): ancestors-or-self minus one
        prefix = prefix & (lens + depth - pos.view(1, 1, s_max) < window)
    visible = prefix | (in_tree & tree_vis)  # (B, N, S)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, N)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("bhns,bhsd->bnhd", probs, v)
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()


def _argmax(row: torch.Tensor) -> int:
    return int(torch.argmax(row))


def verify_greedy_ref(target_logits, draft_tokens, parents, max_accept=None):
    b, n, _ = target_logits.shape
    max_accept = n - 1 if max_accept is None else max_accept
    path = torch.full((b, max_accept + 1), -1, dtype=torch.int64)
    alen = torch.zeros(b, dtype=torch.int64)
    bonus = torch.zeros(b, dtype=torch.int64)
    for r in range(b):
        cur, acc = 0, 0
        path[r, 0] = 0
        while acc < max_accept:
            want = _argmax(target_logits[r, cur])
            nxt = next((j for j in range(cur + 1, n) if parents[r, j] == cur and draft_tokens[r, j] == want), None)
            if nxt is None:
                break
            acc += 1
            path[r, acc] = nxt
            cur = nxt
        alen[r] = acc
        bonus[r] = _argmax(target_logits[r, cur])
    return path, alen, bonus


def processed_probs_ref(logits_row, temperature=1.0, top_k=None, top_p=None):
    """The distribution HF's sampling draws from: logits / T, top-k (ties kept), top-p; fp64 probabilities."""
    s = logits_row.float() / temperature
    s = torch.where(torch.isnan(s), torch.tensor(float("-inf")), s).double()
    v = s.numel()
    keep = torch.ones(v, dtype=torch.bool)
    if top_k is not None and 0 < top_k < v:
        kth = torch.topk(s, top_k).values[-1]
        keep &= s >= kth
    if top_p is not None and top_p < 1.0:
        e = torch.where(keep, torch.exp(s - s.max()), torch.zeros_like(s))
        pk = e / e.sum()
        # mass strictly above each token; keep iff < top_p
        above = torch.stack([pk[s > s[x]].sum() for x in range(v)]) if v <= 4096 else _mass_above(s, pk)
        keep &= above < top_p
    e = torch.where(keep, torch.exp(s - s.max()), torch.zeros_like(s))
    return e / e.sum()


def _mass_above(s, pk):
    order = torch.argsort(s, descending=True)
    ss, ps = s[order], pk[order]
    cum = torch.cumsum(ps, 0) - ps  # mass strictly before in sorted order
    # tokens tied with earlier ones must see the mass before the first of their group
    first = torch.searchsorted(-ss, -ss, side="left")
    above_sorted = cum[first]
    out = torch.empty_like(s)
    out[order] = above_sorted
    return out


def _inverse_cdf(r: torch.Tensor, u: float) -> int:
    """First index whose running sum exceeds u * sum(r), among entries with r > 0; -1 if r == 0.

    The running sum is a sequential fp64 scan, as in the kernels, and the total is its last value.
    """
    r = r.double().clamp(min=0)
    cum = torch.cumsum(r, 0)
    total = float(cum[-1])
    if not total > 0.0:
        return -1
    # cum only grows at entries with r > 0, so the first cum > target is such an entry
    hit = torch.nonzero(cum > u * total)
    if len(hit):
        return int(hit[0])
    return int(torch.nonzero(r > 0)[-1])


def verify_sampling_ref(
    target_logits, draft_tokens, parents, uniforms, temperature=1.0, top_k=None, top_p=None, max_accept=None
):
    b, n, _ = target_logits.shape
    max_accept = n - 1 if max_accept is None else max_accept
    path = torch.full((b, max_accept + 1), -1, dtype=torch.int64)
    alen = torch.zeros(b, dtype=torch.int64)
    bonus = torch.zeros(b, dtype=torch.int64)
    for r in range(b):
        cur, acc = 0, 0
        path[r, 0] = 0
        p = processed_probs_ref(target_logits[r, 0], temperature, top_k, top_p)
        resid = p.clone()
        while acc < max_accept:
            mass, nxt = 1.0, None
            for j in range(cur + 1, n):
                if parents[r, j] != cur:
                    continue
                t = int(draft_tokens[r, j])
                if float(resid[t]) > 0 and float(uniforms[r, j]) * mass < float(resid[t]):
                    nxt = j
                    break
                mass = max(mass - float(resid[t]), 0.0)
                resid[t] = 0.0
            if nxt is None:
                break
            acc += 1
            path[r, acc] = nxt
            cur = nxt
            p = processed_probs_ref(target_logits[r, cur], temperature, top_k, top_p)
            resid = p.clone()
        alen[r] = acc
        x = _inverse_cdf(resid, float(uniforms[r, 0]))
        bonus[r] = x if x >= 0 else int(torch.argmax(p))
    return path, alen, bonus


def chain_speculative_sampling_ref(draft_probs, draft_tokens, target_probs, uniforms):
    b, k, _ = draft_probs.shape
    tokens = torch.full((b, k + 1), -1, dtype=torch.int64)
    alen = torch.zeros(b, dtype=torch.int64)
    for r in range(b):
        i = 0
        while i < k:
            x = int(draft_tokens[r, i])
            q, p = float(draft_probs[r, i, x]), float(target_probs[r, i, x])
            if not float(uniforms[r, i]) * q < p:
                break
            tokens[r, i] = x
            i += 1
        pr = target_probs[r, i].double()
        u = float(uniforms[r, k])
        x = -1
        if i < k:
            x = _inverse_cdf((pr - draft_probs[r, i].double()).clamp(min=0), u)
        if x < 0:
            x = _inverse_cdf(pr.clamp(min=0), u)
        if x < 0:
            x = int(draft_tokens[r, min(i, k - 1)])
        tokens[r, i] = x
        alen[r] = i
    return tokens, alen


def compact_kv_ref(k_caches, v_caches, cache_lens, accept_path, accept_len):
    """Out of place: returns new lists; gathers all sources before writing."""
    outs = []
    for caches in (k_caches, v_caches):
        new = []
        for c in caches:
            c = c.clone()
            for r in range(c.shape[0]):
                base = int(cache_lens[r])
                m = int(accept_len[r]) + 1
                src = base + accept_path[r, :m].to(c.device)
                c[r, :, base : base + m] = c[r, :, src].clone()
            new.append(c)
        outs.append(new)
    return outs[0], outs[1]
