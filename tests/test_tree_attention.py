import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import poison_allocator, random_tree, requires_cuda
from vispec import ops
from vispec.reference import tree_attention_ref

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_inputs(b, n, hq, hkv, d, prefix_lens, dtype, device, gen, shared_mask=False, tree_shaped=True, slack=3):
    s_max = max(prefix_lens) + n + slack
    q = torch.randn(b, n, hq, d, generator=gen).to(dtype)
    # caches as strided views of a larger buffer, like one layer of a static cache
    k_buf = torch.randn(b, hkv, s_max + 5, d, generator=gen).to(dtype)
    v_buf = torch.randn(b, hkv, s_max + 5, d, generator=gen).to(dtype)
    k, v = k_buf[:, :, :s_max], v_buf[:, :, :s_max]
    lens = torch.tensor(prefix_lens, dtype=torch.int64)
    bm = 1 if shared_mask else b
    if tree_shaped:
        parents = torch.stack([random_tree(n, gen) for _ in range(bm)])
        mask = ops.tree_mask_from_parents(parents)
    else:  # arbitrary masks exercise every bit position, diagonal kept
        mask = (torch.rand(bm, n, n, generator=gen) < 0.5) | torch.eye(n, dtype=torch.bool)
    return [t.to(device) for t in (q, k, v, lens, mask)]


def check(q, k, v, lens, mask, device, window=0):
    b, n, hq, d = q.shape
    poison_allocator(q.numel() * q.element_size() * 4, device)
    out, lse = ops.tree_attention(q, k, v, lens, mask, return_lse=True, window=window)
    ref_out, ref_lse = tree_attention_ref(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu(), window=window)
    assert out.shape == (b, n, hq, d) and out.dtype == q.dtype and lse.shape == (b, n, hq)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-3 if q.dtype != torch.float32 else 1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d",
    [(4, 4, 64), (8, 2, 128), (7, 1, 80), (28, 4, 96), (4, 2, 256)],
    ids=["mha-d64", "gqa4-d128", "gqa7-d80", "qwen-d96", "gqa2-d256"],
)
@pytest.mark.parametrize("n", [1, 7, 33, 64])
def test_matches_reference(device, dtype, hq, hkv, d, n):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, hq, hkv, d, n)).encode()))
    lens = [0, 5, 300][: 3 if n < 64 else 2]
    check(*make_inputs(len(lens), n, hq, hkv, d, lens, dtype, device, gen), device)


@pytest.mark.parametrize("prefix", [1024, 4096])
def test_long_prefix(device, prefix):
    gen = torch.Generator().manual_seed(prefix)
    # Rows of very different lengths in one batch, as after a few decode steps.
    check(*make_inputs(2, 30, 8, 2, 128, [prefix, 17], torch.bfloat16, device, gen), device)


@pytest.mark.parametrize("window", [16, 40, 300, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_matches_reference(device, dtype, window):
    """Rows shorter and longer than the window; the long prefix spans many CPU tiles and CUDA splits."""
    gen = torch.Generator().manual_seed(window)
    check(*make_inputs(3, 13, 8, 2, 128, [4100, 20, 9], dtype, device, gen), device, window=window)


def test_sliding_window_semantics(device):
    """A node at position p sees prefix key k iff p - k < window: a window of N on a chain tree
    leaves the deepest node no prefix key at all, the root the last N - 1 of them."""
    gen = torch.Generator().manual_seed(3)
    n, lens = 4, [10]
    q, k, v, cl, _ = make_inputs(1, n, 2, 2, 64, lens, torch.float32, device, gen)
    chain = ops.tree_mask_from_parents(torch.tensor([[-1, 0, 1, 2]])).to(device)
    out = ops.tree_attention(q, k, v, cl, chain, window=n)
    # the deepest node (position 13) sees keys 10.. only: the tree itself; the same as with an empty prefix
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :10] = 1e4  # anything the window must hide
    out2 = ops.tree_attention(q, k2, v2, cl, chain, window=n)
    torch.testing.assert_close(out[:, 3], out2[:, 3])
    assert not torch.allclose(out[:, 0], out2[:, 0])  # the root (position 10) sees keys 7, 8, 9
    with pytest.raises(RuntimeError, match="window must be 0 \\(none\\) or at least the N=4 tree nodes"):
        ops.tree_attention(q, k, v, cl, chain, window=3)


def test_q_as_the_attention_modules_transposed_view(device):
    """q given as (B, Hq, N, D).transpose(1, 2), as attention modules hold it: no copy needed, same result."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, lens, mask = make_inputs(2, 9, 8, 2, 64, [30, 4], torch.float32, device, gen)
    view = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of the transposed layout
    assert not view.is_contiguous()
    out = ops.tree_attention(view, k, v, lens, mask)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ops.tree_attention(q, k, v, lens, mask))
    with pytest.raises(RuntimeError, match="q must be contiguous in the last"):
        ops.tree_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, lens, mask)  # same shape, D strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hq,hkv", [(4, 2, 2), (9, 8, 2)], ids=["few-rows", "many-rows"])
def test_caches_whose_positions_are_not_head_dim_apart(device, dtype, n, hq, hkv):
    """K / V held as (B, S, Hkv, D) and viewed as (B, Hkv, S, D): positions Hkv * D apart, not D (the CPU kernel
    reads fp32 tiles in place, so the row stride must be the cache's)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, lens, mask = make_inputs(2, n, hq, hkv, 128, [70, 9], dtype, device, gen)
    k_bshd, v_bshd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ks, vs = k_bshd.transpose(1, 2), v_bshd.transpose(1, 2)  # the same values, stride(2) = Hkv * D
    assert ks.stride(2) == hkv * 128 and torch.equal(ks, k)
    check(q, ks, vs, lens, mask, device)
    torch.testing.assert_close(ops.tree_attention(q, ks, vs, lens, mask), ops.tree_attention(q, k, v, lens, mask),
                               atol=0, rtol=0)


@pytest.mark.parametrize("prefix", [40, 4100])
def test_nan_keys_poison_the_rows_that_see_them_and_no_others(device, prefix):
    """A NaN key: every row that sees it gets 0 (lse -inf), whatever the split count; a row that does not see it
    (another batch row, or a tree node it is no ancestor of) is unaffected."""
    gen = torch.Generator().manual_seed(prefix)
    n = 6
    q, k, v, lens, mask = make_inputs(2, n, 4, 2, 64, [prefix, 12], torch.float32, device, gen)
    clean_out = ops.tree_attention(q, k, v, lens, mask)
    k = k.clone()
    k[0, :, 0] = float("nan")  # the oldest prefix key of row 0: seen by all its nodes
    last = int(lens[1]) + n - 1
    k[1, :, last] = float("nan")  # row 1's last tree node: seen by that node alone (a leaf)
    out, lse = ops.tree_attention(q, k, v, lens, mask, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    sees = mask[1 if mask.shape[0] > 1 else 0][:, n - 1].cpu()  # nodes of row 1 that see node n-1
    assert torch.all(out[1][sees] == 0)
    torch.testing.assert_close(out[1][~sees], clean_out[1][~sees])


@pytest.mark.parametrize("shared_mask", [True, False])
def test_arbitrary_masks_and_sharing(device, shared_mask):
    gen = torch.Generator().manual_seed(7)
    check(
        *make_inputs(3, 45, 4, 4, 64, [10, 0, 77], torch.float32, device, gen, shared_mask=shared_mask, tree_shaped=False),
        device,
    )


# The CUDA op has two main kernels: tensor cores (bf16 / fp16, head dim <= 128, sm_80+) and SIMT (everything
# else, or VISPEC_TREE_ATTENTION_KERNEL=simt). Both must match the reference on what distinguishes the
# tensor-core tiling: several 64-row tiles (GQA 7 x 100 nodes), tree keys across two 64-key tiles and mask
# words, splits of a long prefix, a sliding window, and NaN keys on every split count.
CUDA_KERNELS = ["tc", "simt"]


def use_kernel(monkeypatch, kernel):
    if kernel == "simt":
        monkeypatch.setenv("VISPEC_TREE_ATTENTION_KERNEL", "simt")
    else:  # the default; an outer VISPEC_TREE_ATTENTION_KERNEL=simt must not leak in
        monkeypatch.delenv("VISPEC_TREE_ATTENTION_KERNEL", raising=False)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,n,lens,window", [
    (28, 4, 128, 100, [4100, 3, 70], 0),
    (7, 1, 80, 65, [0, 129], 0),
    (8, 8, 64, 130, [64, 1], 0),
    (12, 2, 96, 30, [1, 5000], 0),
    (8, 2, 128, 13, [4100, 20], 300),
    (32, 32, 128, 60, [4096], 0),
], ids=["qwen-n100-split", "d80-n65", "mha-n130", "d96-split", "window", "llava-n60"])
def test_cuda_kernels_match_reference(monkeypatch, kernel, dtype, hq, hkv, d, n, lens, window):
    use_kernel(monkeypatch, kernel)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, hq, d, n, lens)).encode()))
    check(*make_inputs(len(lens), n, hq, hkv, d, lens, dtype, "cuda", gen), "cuda", window=window)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("prefix", [40, 4100])
def test_cuda_kernels_nan_semantics(monkeypatch, kernel, prefix):
    use_kernel(monkeypatch, kernel)
    gen = torch.Generator().manual_seed(prefix)
    n = 70
    q, k, v, lens, mask = make_inputs(2, n, 8, 2, 128, [prefix, 12], torch.bfloat16, "cuda", gen)
    k = k.clone()
    k[0, :, 0] = float("nan")  # row 0's oldest prefix key: every node of row 0 sees it
    k[1, :, int(lens[1]) + n - 1] = float("nan")  # row 1's last node (second 64-key tree tile): seen by itself
    out, lse = ops.tree_attention(q, k, v, lens, mask, return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    sees = mask[1][:, n - 1].cpu()
    assert torch.all(out[1][sees] == 0)
    ref, _ = tree_attention_ref(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu())
    torch.testing.assert_close(out[1][~sees].cpu().float(), ref[1][~sees].float(), atol=1.6e-2, rtol=1.6e-2)


def test_odd_head_dim_cpu():
    # The CPU kernel takes any head dim.
    gen = torch.Generator().manual_seed(3)
    check(*make_inputs(2, 9, 6, 3, 72, [4, 40], torch.float32, "cpu", gen), "cpu")


def test_tree_without_prefix_is_causal_attention(device):
    # A chain tree over an empty prefix is ordinary causal attention: compare with SDPA.
    gen = torch.Generator().manual_seed(11)
    n, h, d = 16, 4, 64
    q = torch.randn(1, n, h, d, generator=gen)
    k = torch.randn(1, h, n, d, generator=gen)
    v = torch.randn(1, h, n, d, generator=gen)
    parents = torch.arange(-1, n - 1).unsqueeze(0)
    mask = ops.tree_mask_from_parents(parents)
    out = ops.tree_attention(q.to(device), k.to(device), v.to(device), torch.zeros(1, dtype=torch.int64, device=device), mask.to(device))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


def test_row_seeing_nothing_gives_zero_not_nan(device):
    q = torch.randn(1, 2, 2, 64, device=device)
    k = torch.randn(1, 2, 4, 64, device=device)
    v = torch.randn(1, 2, 4, 64, device=device)
    mask = torch.tensor([[[True, False], [False, False]]], device=device)  # node 1 sees nothing
    out, lse = ops.tree_attention(q, k, v, torch.zeros(1, dtype=torch.int64, device=device), mask, return_lse=True)
    assert torch.all(out[0, 1] == 0) and torch.all(torch.isneginf(lse[0, 1]))
    assert torch.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_mask_from_parents_is_ancestor_relation(n, seed):
    parents = random_tree(n, torch.Generator().manual_seed(seed)).unsqueeze(0)
    mask = ops.tree_mask_from_parents(parents)[0]
    for i in range(n):
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = int(parents[0, j])
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == anc


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_pack_tree_mask_bits(n, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, n, n, generator=gen) < 0.5
    packed = ops.pack_tree_mask(mask)
    assert packed.shape == (2, n, (n + 31) // 32) and packed.dtype == torch.int32
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(32)) & 1
    unpacked = bits.reshape(2, n, -1)[..., :n].bool()
    assert torch.equal(unpacked, mask)
