"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) through them."""
import pytest
import torch

from vispec import ops

from test_verify import make_tree_batch, seeded


def op_samples(device):
    gen = seeded("opcheck")
    b, n, hq, hkv, d, s = 2, 5, 4, 2, 64, 24
    q = torch.randn(b, n, hq, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    lens = torch.tensor([3, 10])
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 3]])
    mask = ops.pack_tree_mask(ops.tree_mask_from_parents(parents))
    logits, tokens, par = make_tree_batch(b, n, 50, gen)
    u = torch.rand(b, n, dtype=torch.float64, generator=gen)
    dp = torch.softmax(torch.randn(b, 3, 50, generator=gen), -1)
    tp = torch.softmax(torch.randn(b, 4, 50, generator=gen), -1)
    dt = torch.randint(0, 50, (b, 3), generator=gen)
    uc = torch.rand(b, 4, dtype=torch.float64, generator=gen)
    kc = [torch.randn(b, 2, 16, 8, generator=gen) for _ in range(3)]
    vc = [torch.randn(b, 2, 16, 8, generator=gen) for _ in range(3)]
    path = torch.tensor([[0, 2, 3], [0, 1, -1]])
    alen = torch.tensor([2, 1])
    to = lambda *ts: [t.to(device) if isinstance(t, torch.Tensor) else [x.to(device) for x in t] for t in ts]  # noqa: E731
    return {
        "tree_attention": (torch.ops.vispec.tree_attention, (*to(q, k, v, lens, mask), 0.125, True)),
        "tree_attention_nolse": (torch.ops.vispec.tree_attention, (*to(q, k, v, lens, mask), 0.125, False)),
        "verify_greedy": (torch.ops.vispec.verify_greedy, (*to(logits, tokens, par), n - 1)),
        "verify_sampling": (torch.ops.vispec.verify_sampling, (*to(logits, tokens, par, u), 0.8, 10, 0.9, 3)),
        "chain": (torch.ops.vispec.chain_speculative_sampling, tuple(to(dp, dt, tp, uc))),
        "compact_kv_": (torch.ops.vispec.compact_kv_, (*to(kc, vc, torch.tensor([2, 5]), path, alen),)),
    }


@pytest.mark.parametrize(
    "name", ["tree_attention", "tree_attention_nolse", "verify_greedy", "verify_sampling", "chain", "compact_kv_"]
)
def test_opcheck(device, name):
    op, args = op_samples(device)[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    """One engine-like step (attention, greedy verify, compaction) compiles as a single graph."""
    samples = op_samples(device)
    q, k, v, lens, mask, scale, _ = samples["tree_attention"][1]
    logits, tokens, parents, _ = samples["verify_greedy"][1]
    kc, vc, clens, _, _ = samples["compact_kv_"][1]

    def step(q, k, v, lens, mask, logits, tokens, parents, kc, vc, clens):
        out, lse = torch.ops.vispec.tree_attention(q, k, v, lens, mask, scale, True)
        path, alen, bonus = torch.ops.vispec.verify_greedy(logits * 1.0, tokens, parents, 2)
        torch.ops.vispec.compact_kv_(kc, vc, clens, path, alen)
        return out * 2, lse, path, alen, bonus

    compiled = torch.compile(step, fullgraph=True)
    kc2 = [t.clone() for t in kc]
    vc2 = [t.clone() for t in vc]
    got = compiled(q, k, v, lens, mask, logits, tokens, parents, kc, vc, clens)
    want = step(q, k, v, lens, mask, logits, tokens, parents, kc2, vc2, clens)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(kc + vc, kc2 + vc2):
        assert torch.equal(g, w)
