import zlib

import pytest
import torch

from conftest import HAS_CUDA, random_tree
from vispec import ops
from vispec.reference import (
    chain_speculative_sampling_ref,
    processed_probs_ref,
    verify_greedy_ref,
    verify_sampling_ref,
)


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_tree_batch(b, n, v, gen, hit_rate=0.7, dtype=torch.float32, temperature=1.0):
    """Random trees whose draft tokens often equal the parent's argmax (so paths get accepted)."""
    logits = (torch.randn(b, n, v, generator=gen) * 3).to(dtype)
    parents = torch.stack([random_tree(n, gen) for _ in range(b)])
    tokens = torch.randint(0, v, (b, n), generator=gen)
    amax = logits.float().argmax(-1)
    hits = torch.rand(b, n, generator=gen) < hit_rate
    for r in range(b):
        for j in range(1, n):
            if hits[r, j]:
                tokens[r, j] = amax[r, parents[r, j]]
    return logits, tokens, parents


# ---------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v", [111, 32000, 152064])
@pytest.mark.parametrize("n", [1, 8, 30, 64])
def test_verify_greedy_matches_reference(device, dtype, v, n):
    b = 3 if v < 100000 else 2
    logits, tokens, parents = make_tree_batch(b, n, v, seeded("g", dtype, v, n), dtype=dtype)
    for max_accept in sorted({n - 1, min(3, n - 1), 0}):
        path, alen, bonus = ops.verify_greedy(logits.to(device), tokens.to(device), parents.to(device), max_accept)
        want = verify_greedy_ref(logits, tokens, parents, max_accept)
        for got, exp in zip((path, alen, bonus), want):
            assert torch.equal(got.cpu(), exp)
        assert (alen.cpu() <= max_accept).all()


def test_verify_greedy_chain_accepts_all_then_bonus(device):
    # A chain whose every token is the target's argmax: all accepted, bonus = argmax at the leaf.
    v, n = 50, 6
    logits = torch.randn(1, n, v)
    tokens = torch.zeros(1, n, dtype=torch.int64)
    tokens[0, 1:] = logits[0, :-1].argmax(-1)
    parents = torch.arange(-1, n - 1).unsqueeze(0)
    path, alen, bonus = ops.verify_greedy(logits.to(device), tokens.to(device), parents.to(device))
    assert path.tolist() == [list(range(n))] and alen.item() == n - 1
    assert bonus.item() == int(logits[0, -1].argmax())


def test_verify_greedy_ties_and_nan_follow_torch_argmax(device):
    logits = torch.zeros(1, 3, 10)
    logits[0, 0, [4, 7]] = 5.0  # tie: the first index wins, as in torch.argmax
    logits[0, 1, 2] = float("nan")  # NaN wins, as in torch.argmax
    tokens = torch.tensor([[0, 7, 4]])
    parents = torch.tensor([[-1, 0, 0]])
    path, alen, bonus = ops.verify_greedy(logits.to(device), tokens.to(device), parents.to(device))
    assert path.tolist() == [[0, 2, -1]] and alen.item() == 1
    assert bonus.item() == int(torch.argmax(logits[0, 2]))


# ---------------------------------------------------------------------------
# Sampling: exact agreement with the reference on explicit uniforms
# ---------------------------------------------------------------------------
SAMPLING_SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.9, top_k=20, top_p=0.9),
    dict(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [111, 32000])
@pytest.mark.parametrize("cfg", SAMPLING_SETTINGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_verify_sampling_matches_reference(device, dtype, v, cfg):
    gen = seeded("s", dtype, v, tuple(cfg.items()))
    b, n = 4, 24
    # Peaked logits so that acceptances happen; draft tokens often the mode.
    logits, tokens, parents = make_tree_batch(b, n, v, gen, hit_rate=0.8)
    logits.scatter_add_(2, logits.argmax(-1, keepdim=True), torch.full((b, n, 1), 12.0))  # a clear mode
    logits = logits.to(dtype)
    uniforms = torch.rand(b, n, dtype=torch.float64, generator=gen)
    got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device), uniforms=uniforms.to(device), **cfg)
    want = verify_sampling_ref(logits, tokens, parents, uniforms, **cfg)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    assert got[1].sum() > 0, "the test should exercise acceptances"


@pytest.mark.parametrize("cfg", [dict(top_k=7), dict(top_k=200, top_p=0.9), dict(top_k=3000), dict(top_p=0.5),
                                 dict(temperature=0.05, top_k=40)], ids=str)
def test_verify_sampling_ties_nan_and_chunk_edges_match_reference(device, cfg):
    """Logits on a coarse grid (ties at the k-th value spread over many 64-token chunks), NaN and -inf entries,
    rows with fewer finite values than k, a vocabulary that is no multiple of the chunk: the chunk-skipping
    top-k and survivor scan of the CPU op must give the reference's decisions exactly."""
    gen = seeded("ties", tuple(cfg.items()))
    b, n, v = 3, 16, 4001
    logits, tokens, parents = make_tree_batch(b, n, v, gen, hit_rate=0.8)
    logits = (logits * 2).round() / 2  # few distinct values: long runs of ties
    logits.scatter_add_(2, logits.argmax(-1, keepdim=True), torch.full((b, n, 1), 6.0))
    logits[0, :, 100:160] = float("nan")
    logits[1, :, ::3] = float("-inf")
    logits[2, 5, :] = float("-inf")
    logits[2, 5, 4000] = 1.0  # one finite value, in the last partial chunk
    uniforms = torch.rand(b, n, dtype=torch.float64, generator=gen)
    got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device), uniforms=uniforms.to(device), **cfg)
    want = verify_sampling_ref(logits, tokens, parents, uniforms, **cfg)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("k", [3, 60])
def test_verify_sampling_top_k_over_a_flat_vocabulary_matches_reference(device, k):
    """Top-k over rows where almost every token ties for the maximum (V >> the CUDA kernel's candidate
    buffer, so its chunk-maximum bound admits every token and it must fall back to the full search), and
    rows where a few tokens stand out (the bound admits ~k chunks)."""
    gen = seeded("flat", k)
    b, n, v = 2, 9, 9000
    logits, tokens, parents = make_tree_batch(b, n, v, gen, hit_rate=0.5)
    logits[0] = 0.0  # row 0: one big tie
    logits[0, :, 17] = 0.5
    logits[1] = -30.0  # row 1: a few tokens far above the rest
    logits[1, :, 5000:5000 + 2 * k] = torch.randn(n, 2 * k, generator=gen)
    uniforms = torch.rand(b, n, dtype=torch.float64, generator=gen)
    for cfg in (dict(top_k=k), dict(top_k=k, top_p=0.7)):
        got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device),
                                  uniforms=uniforms.to(device), **cfg)
        want = verify_sampling_ref(logits, tokens, parents, uniforms, **cfg)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w)


def test_portable_scans_give_the_same_decisions():
    """The CPU row scans have an AVX-512 body and a portable one (VISPEC_NO_AVX512=1 forces it, as on a CPU
    without AVX-512): both must give the reference's decisions, greedy and sampled, with NaN, -inf, ties
    and a partial last chunk in the rows."""
    import os
    import subprocess
    import sys

    code = """
import torch
from vispec import ops
from vispec.reference import verify_greedy_ref, verify_sampling_ref
g = torch.Generator().manual_seed(5)
b, n, v = 3, 12, 1000
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = ((torch.randn(b, n, v, generator=g) * 2).round() / 2).to(dtype)
    logits[0, :, 70:90] = float("nan")
    logits[1, :, ::2] = float("-inf")
    logits[2, 3, -1] = 50.0
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 8]).expand(b, n).contiguous()
    tokens = torch.gather(logits.float().argmax(-1), 1, parents.clamp(min=0))
    assert all(torch.equal(x, y) for x, y in zip(ops.verify_greedy(logits, tokens, parents),
                                                 verify_greedy_ref(logits, tokens, parents, n - 1)))
    u = torch.rand(b, n, dtype=torch.float64, generator=g)
    for cfg in (dict(top_k=5), dict(top_k=20, top_p=0.8), dict(temperature=0.7)):
        got = ops.verify_sampling(logits, tokens, parents, uniforms=u, **cfg)
        want = verify_sampling_ref(logits, tokens, parents, u, **cfg)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), (dtype, cfg)
print("ok")
"""
    for env in ({}, {"VISPEC_NO_AVX512": "1"}):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (env, r.stderr[-2000:])


def test_processed_distribution_matches_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=gen) * 2
    logits[0, :7] = 3.0  # ties at the top-k boundary
    for t, k, p in [(1.0, None, None), (0.6, 7, None), (1.2, None, 0.7), (0.8, 40, 0.9), (1.0, 3, 0.5)]:
        s = TemperatureLogitsWarper(t)(None, logits.clone())
        if k is not None:
            s = TopKLogitsWarper(k)(None, s)
        if p is not None:
            s = TopPLogitsWarper(p)(None, s)
        hf = torch.softmax(s.double(), -1)[0]
        ours = processed_probs_ref(logits[0], t, k, p)
        assert torch.equal(hf > 0, ours > 0), (t, k, p)
        torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-5)


def test_zero_uniform_never_accepts_zero_probability(device):
    # Target gives the drafted tokens p = 0 (outside top-k); even a uniform of exactly 0 must reject.
    v, n = 20, 4
    logits = torch.arange(v, dtype=torch.float32).flip(0).repeat(1, n, 1)  # token 0 most likely
    tokens = torch.tensor([[0, 19, 18, 17]])
    parents = torch.tensor([[-1, 0, 0, 0]])
    u = torch.zeros(1, n, dtype=torch.float64)
    path, alen, bonus = ops.verify_sampling(
        logits.to(device), tokens.to(device), parents.to(device), top_k=3, uniforms=u.to(device)
    )
    assert alen.item() == 0 and path.tolist() == [[0, -1, -1, -1]]
    assert bonus.item() == 0  # u = 0 draws the first token of positive probability


def test_last_kept_child_is_accepted_and_excluded_tokens_never_come_out(device):
    """Issue 11, bug 1: 25 equally likely kept tokens (top_k=25 drops token 25), all of them the root's
    children, acceptance uniforms 0.9999999. Each child is rejected until the last, which must be
    accepted (its probability equals the mass left); in fp32 the masses summed below 1 and the CUDA
    kernel rejected it, then returned token 25, which top-k had excluded."""
    v, n = 26, 26
    logits = torch.zeros(1, n, v)
    logits[..., 25] = -10.0
    tokens = torch.cat([torch.tensor([[3]]), torch.arange(25).view(1, 25)], 1)
    parents = torch.tensor([[-1] + [0] * 25])
    u = torch.full((1, n), 0.9999999, dtype=torch.float64)
    u[0, 0] = 0.5  # the bonus's own uniform: token 12 of the 25
    want = verify_sampling_ref(logits, tokens, parents, u, temperature=1.0, top_k=25, max_accept=1)
    assert want[1].item() == 1 and want[0].tolist() == [[0, 25]] and want[2].item() == 12
    got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device), temperature=1.0, top_k=25,
                              max_accept=1, uniforms=u.to(device))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_sampling_is_deterministic_per_seed(device):
    logits, tokens, parents = make_tree_batch(8, 16, 64, seeded("det"), hit_rate=0.8)
    args = (logits.to(device), tokens.to(device), parents.to(device))
    a = ops.verify_sampling(*args, seed=123)
    b = ops.verify_sampling(*args, seed=123)
    c = ops.verify_sampling(*args, seed=124)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    assert all(torch.equal(x, y) for x, y in zip(ops.verify_sampling(*args, generator=g1), ops.verify_sampling(*args, generator=g2)))


# ---------------------------------------------------------------------------
# Sampling: the emitted tokens follow the target distribution
# ---------------------------------------------------------------------------
DRAWS = 100_000
# An exact sampler's TV distance over V <= 16 categories from 1e5 draws is about
# sum_x sqrt(p_x / (2 pi n)) < 0.005; 0.015 is > 4 standard deviations away.
TV_BOUND = 0.015


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts.double() / counts.sum() - probs.double()).abs().sum())


def emitted(path, alen, bonus, tokens, depth):
    """Token at position `depth` (1-based) of each row's output, -1 where the row emitted fewer."""
    rows = torch.arange(path.shape[0])
    out = torch.full((path.shape[0],), -1, dtype=torch.int64)
    acc = alen >= depth
    out[acc] = tokens[rows[acc], path[acc, depth]]
    at_bonus = alen == depth - 1
    out[at_bonus] = bonus[at_bonus]
    return out


ADVERSARIAL = {
    # name: (root logits, child tokens at depth 1)
    "p0-drafts": (torch.tensor([3.0, 2.0, 1.0, 0.5, -1e9, -1e9, 0.0, 1.5]), [4, 5, 0]),  # two drafts the target never emits
    "peaked": (torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), [1, 0, 2]),
    "flat": (torch.zeros(8), [0, 1, 2, 3, 4, 5, 6]),
    "duplicates": (torch.tensor([1.0, 2.0, 0.0, 0.5, 0.1, 0.2, 0.3, 0.4]), [1, 1, 3, 1]),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
@pytest.mark.parametrize(
    "cfg", [dict(temperature=1.0), dict(temperature=0.8, top_k=4), dict(temperature=1.5, top_p=0.85)],
    ids=["plain", "topk4", "topp.85"],
)
def test_verify_sampling_distribution(device, case, cfg):
    root, children = ADVERSARIAL[case]
    v = root.numel()
    m = len(children)
    # Tree: root -> m children; the first child has two children of its own (depth 2).
    n = 1 + m + 2
    parents = torch.tensor([-1] + [0] * m + [1, 1])
    gen = seeded("dist", case, tuple(cfg.items()))
    node_logits = torch.randn(n, v, generator=gen)
    node_logits[0] = root
    tokens = torch.tensor([0] + children + [int(node_logits[1].argmax()), 3])
    logits = node_logits.expand(DRAWS, n, v).contiguous()
    toks = tokens.expand(DRAWS, n).contiguous()
    pars = parents.expand(DRAWS, n).contiguous()
    path, alen, bonus = ops.verify_sampling(
        logits.to(device), toks.to(device), pars.to(device), seed=zlib.crc32(case.encode()), **cfg
    )
    path, alen, bonus = path.cpu(), alen.cpu(), bonus.cpu()
    first = emitted(path, alen, bonus, toks, 1)
    p_root = processed_probs_ref(root, **cfg)
    assert (first >= 0).all()
    assert (p_root[first] > 0).all(), "emitted a token the target gives probability 0"
    assert tv(torch.bincount(first, minlength=v), p_root) < TV_BOUND
    # Given the first token came from child node 1, the second must follow node 1's distribution.
    via1 = path[:, 1] == 1
    if via1.sum() > 20000:
        second = emitted(path[via1], alen[via1], bonus[via1], toks[via1], 2)
        assert tv(torch.bincount(second, minlength=v), processed_probs_ref(node_logits[1], **cfg)) < 2 * TV_BOUND


def test_chain_matches_reference(device):
    gen = seeded("chain")
    b, k, v = 6, 5, 300
    q = torch.softmax(torch.randn(b, k, v, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(b, k + 1, v, generator=gen) * 2, -1)
    p[:, :k] = 0.5 * p[:, :k] + 0.5 * q  # overlap so that drafts get accepted
    tokens = torch.multinomial(q.reshape(-1, v), 1, generator=gen).reshape(b, k)
    u = torch.rand(b, k + 1, dtype=torch.float64, generator=gen)
    got = ops.chain_speculative_sampling(q.to(device), tokens.to(device), p.to(device), uniforms=u.to(device))
    want = chain_speculative_sampling_ref(q, tokens, p, u)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    assert 0 < got[1].sum() < b * k


@pytest.mark.parametrize("kind", ["disjoint", "overlap", "equal"])
def test_chain_distribution(device, kind):
    v, k = 10, 2
    gen = seeded("chaind", kind)
    q = torch.softmax(torch.randn(k, v, generator=gen), -1)
    p = torch.softmax(torch.randn(k + 1, v, generator=gen), -1)
    if kind == "disjoint":  # draft puts all mass where the target has none
        q[:, :5], p[:k, 5:] = 0, 0
        q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    elif kind == "equal":
        p[:k] = q
    tokens = torch.stack([torch.multinomial(q[i], DRAWS, replacement=True, generator=gen) for i in range(k)], 1)
    out, alen = ops.chain_speculative_sampling(
        q.expand(DRAWS, k, v).contiguous().to(device), tokens.to(device), p.expand(DRAWS, k + 1, v).contiguous().to(device), seed=1
    )
    first = out[:, 0].cpu()
    assert tv(torch.bincount(first, minlength=v), p[0]) < TV_BOUND
    if kind == "equal":
        assert (alen == k).all()
    if kind == "disjoint":
        assert (alen == 0).all()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: 4.6 GB of logits")
@pytest.mark.cuda
def test_verify_greedy_int64_offsets_cuda():
    # B * N * V > 2^31: row * vocab offsets must not overflow int32.
    b, n, v = 140, 64, 256000
    logits = torch.zeros(b, n, v, dtype=torch.float16, device="cuda")
    logits[-1, -1, v - 3] = 1.0
    tokens = torch.zeros(b, n, dtype=torch.int64, device="cuda")
    parents = torch.arange(-1, n - 1, device="cuda").expand(b, n).contiguous()
    _, _, bonus = ops.verify_greedy(logits, tokens, parents)
    assert bonus[-1].item() == v - 3  # row b-1 accepts the all-zero chain up to the last node
