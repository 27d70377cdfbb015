"""Bad inputs raise an error that names the problem, before any work is done."""
import pytest
import torch

from vispec import ops


def attn_inputs(**over):
    base = dict(
        q=torch.randn(2, 4, 8, 64),
        k=torch.randn(2, 2, 32, 64),
        v=torch.randn(2, 2, 32, 64),
        lens=torch.tensor([3, 5]),
        mask=torch.ones(2, 4, 4, dtype=torch.bool).tril(),
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    "over,msg",
    [
        (dict(q=torch.randn(2, 4, 8)), r"q must have shape \(B, N, Hq, D\)"),
        (dict(q=torch.randn(2, 4, 5, 64)), "head count 5 must be a multiple of the cache.s 2 kv heads"),
        (dict(k=torch.randn(2, 2, 32, 64).half()), "k_cache and v_cache must have the dtype of q"),
        (dict(v=torch.randn(2, 2, 30, 64)), "v_cache must have the shape of k_cache"),
        (dict(lens=torch.tensor([3, 5], dtype=torch.int32)), "cache_lens must be int64"),
        (dict(lens=torch.tensor([3])), r"cache_lens must have shape \[2\]"),
        (dict(lens=torch.tensor([3, 29])), r"cache_lens\[1\]=29 is out of range"),
        (dict(lens=torch.tensor([-1, 0])), r"cache_lens\[0\]=-1 is out of range"),
        (dict(mask=torch.ones(2, 5, 5, dtype=torch.bool)), r"tree_mask must have shape \(2 or 1, 4, 1\)"),
        (dict(q=torch.randn(2, 4, 64, 8).transpose(2, 3)), "q must be contiguous in the last"),
        (dict(k=torch.randn(2, 2, 64, 32).transpose(2, 3)), "contiguous in the last"),
        (dict(q=torch.randn(2, 4, 8, 64, dtype=torch.float64)), "q must be float32, float16 or bfloat16"),
    ],
)
def test_tree_attention_errors(over, msg):
    a = attn_inputs(**over)
    with pytest.raises(RuntimeError, match=msg):
        ops.tree_attention(a["q"], a["k"], a["v"], a["lens"], a["mask"])


def test_tree_attention_int_mask_must_be_packed():
    a = attn_inputs()
    with pytest.raises(RuntimeError, match="bit-packed int32"):
        ops.tree_attention(a["q"], a["k"], a["v"], a["lens"], a["mask"].long())


def verify_inputs():
    return torch.randn(2, 4, 30), torch.randint(0, 30, (2, 4)), torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]])


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda l, t, p: (l, t, p.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(0))), r"parents\[0, 0\] must be -1"),
        (lambda l, t, p: (l, t, p.clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(2))), r"parents\[1, 2\]=2 is invalid"),
        (lambda l, t, p: (l, t.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(30)), p), r"draft_tokens\[1, 3\]=30 is outside the vocabulary \[0, 30\)"),
        (lambda l, t, p: (l, t.int(), p), "draft_tokens must be int64"),
        (lambda l, t, p: (l, t[:, :3].contiguous(), p), r"draft_tokens must have shape \[2, 4\]"),
        (lambda l, t, p: (l.double(), t, p), "target_logits must be float32, float16 or bfloat16"),
        (lambda l, t, p: (l[:, :, ::2], t, p), "target_logits must be contiguous"),
    ],
)
def test_verify_errors(mutate, msg):
    l, t, p = mutate(*verify_inputs())
    with pytest.raises(RuntimeError, match=msg):
        ops.verify_greedy(l, t, p)
    with pytest.raises(RuntimeError, match=msg):
        ops.verify_sampling(l, t, p, seed=0)


def test_verify_max_accept_range():
    l, t, p = verify_inputs()
    with pytest.raises(RuntimeError, match=r"max_accept must be in \[0, N-1\] = \[0, 3\], got 4"):
        ops.verify_greedy(l, t, p, max_accept=4)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(uniforms=torch.rand(2, 4)), "uniforms must be float64"),
        (dict(uniforms=torch.rand(2, 3, dtype=torch.float64)), r"uniforms must have shape \(2, 4\)"),
        (dict(uniforms=torch.ones(2, 4, dtype=torch.float64)), r"uniforms must lie in \[0, 1\)"),
    ],
)
def test_sampling_param_errors(kw, msg):
    with pytest.raises(RuntimeError, match=msg):
        ops.verify_sampling(*verify_inputs(), **kw)


def test_seed_and_generator_exclusive():
    with pytest.raises(ValueError, match="either seed or generator"):
        ops.verify_sampling(*verify_inputs(), seed=1, generator=torch.Generator())


def test_chain_errors():
    q = torch.softmax(torch.randn(2, 3, 10), -1)
    p = torch.softmax(torch.randn(2, 4, 10), -1)
    t = torch.randint(0, 10, (2, 3))
    with pytest.raises(RuntimeError, match=r"target_probs must have shape \(2, 4, 10\)"):
        ops.chain_speculative_sampling(q, t, p[:, :3].contiguous(), seed=0)
    with pytest.raises(RuntimeError, match="target_probs must have the dtype of draft_probs"):
        ops.chain_speculative_sampling(q, t, p.half(), seed=0)
    with pytest.raises(RuntimeError, match=r"draft_tokens\[1, 2\]=10 is outside the vocabulary"):
        ops.chain_speculative_sampling(q, torch.tensor([[0, 1, 2], [3, 4, 10]]), p, seed=0)


def compact_inputs():
    k = [torch.zeros(2, 2, 16, 8) for _ in range(2)]
    v = [torch.zeros(2, 2, 16, 8) for _ in range(2)]
    return k, v, torch.tensor([2, 3]), torch.tensor([[0, 2, 3], [0, 1, -1]]), torch.tensor([2, 1])


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda k, v, c, p, a: (k, v[:1], c, p, a), "same number of layers"),
        (lambda k, v, c, p, a: (k, [v[0], torch.zeros(2, 2, 16, 8).half()], c, p, a), r"v_caches\[1\] has dtype"),
        (lambda k, v, c, p, a: (k, [v[0], torch.zeros(2, 2, 15, 8)], c, p, a), r"v_caches\[1\] has shape"),
        (lambda k, v, c, p, a: (k, v, c, torch.tensor([[0, 3, 2], [0, 1, -1]]), a), "must be strictly increasing"),
        (lambda k, v, c, p, a: (k, v, c, torch.tensor([[1, 2, 3], [0, 1, -1]]), a), r"accept_path\[0, 0\] must be 0"),
        (lambda k, v, c, p, a: (k, v, c, p, torch.tensor([3, 1])), r"accept_len\[0\]=3 must be in \[0, 2\]"),
        (lambda k, v, c, p, a: (k, v, torch.tensor([14, 3]), p, a), r"points past the cache's S_max=16"),
        (lambda k, v, c, p, a: ([k[0], k[0]], v, c, p, a), r"k_caches\[0\] and k_caches\[1\] are the same memory"),
        (lambda k, v, c, p, a: (k, [k[0], v[1]], c, p, a), r"k_caches\[0\] and v_caches\[0\] are the same memory"),
        (lambda k, v, c, p, a: ([torch.zeros(1, 2, 16, 8).expand(2, 2, 16, 8) for _ in k],
                                [torch.zeros(1, 2, 16, 8).expand(2, 2, 16, 8) for _ in v], c, p, a),
         r"k_caches\[0\] has overlapping elements \(a stride of 0\?\)"),
    ],
)
def test_compact_errors(mutate, msg):
    with pytest.raises(RuntimeError, match=msg):
        ops.compact_kv_(*mutate(*compact_inputs()))


def test_check_tree_names_the_entry():
    with pytest.raises(ValueError, match=r"parents\[0, 2\]=5 is invalid"):
        ops.check_tree(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 0, 5]]), 10)
    with pytest.raises(ValueError, match=r"draft_tokens\[0, 1\]=10 is outside"):
        ops.check_tree(torch.tensor([[0, 10, 1]]), torch.tensor([[-1, 0, 0]]), 10)
