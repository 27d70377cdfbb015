import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_tree
from vispec import ops
from vispec.reference import compact_kv_ref


def random_paths(parents: torch.Tensor, gen: torch.Generator, p: int):
    """A root-to-node path per row, truncated to P entries, -1 padded (as verify_* return)."""
    b, n = parents.shape
    path = torch.full((b, p), -1, dtype=torch.int64)
    alen = torch.zeros(b, dtype=torch.int64)
    for r in range(b):
        node = int(torch.randint(0, n, (1,), generator=gen))
        chain = []
        while node >= 0:
            chain.append(node)
            node = int(parents[r, node])
        chain = chain[::-1][:p]
        path[r, : len(chain)] = torch.tensor(chain)
        alen[r] = len(chain) - 1
    return path, alen


def run_case(device, layers, b, h, d, n, dtype, gen, p=None):
    p = n if p is None else p
    s_max = 64 + n + 4
    lens = torch.randint(0, 64, (b,), generator=gen)
    # All layers as views of one buffer (a static cache), and a strided S dimension.
    buf = torch.randn(2, layers, b, h, s_max + 3, d, generator=gen).to(dtype)
    k = [buf[0, l, :, :, :s_max] for l in range(layers)]
    v = [buf[1, l, :, :, :s_max] for l in range(layers)]
    parents = torch.stack([random_tree(n, gen) for _ in range(b)])
    path, alen = random_paths(parents, gen, p)
    want_k, want_v = compact_kv_ref(k, v, lens, path, alen)
    kd = [t.to(device) for t in k]
    vd = [t.to(device) for t in v]
    new_lens = ops.compact_kv_(kd, vd, lens.to(device), path.to(device), alen.to(device))
    assert torch.equal(new_lens.cpu(), lens + alen + 1)
    for got, want in zip(kd + vd, want_k + want_v):
        assert torch.equal(got.cpu(), want)  # every element, including the untouched ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layers,h,d", [(1, 1, 64), (4, 8, 128), (3, 4, 80), (2, 2, 6)])
def test_matches_reference(device, dtype, layers, h, d):
    gen = torch.Generator().manual_seed(layers * 100 + h * 10 + d)
    run_case(device, layers, 3, h, d, 30, dtype, gen)


def test_overlapping_path_values(device):
    # Path [0, 2, 3, 5] at prefix 4: sources and destinations overlap (6->5, 7->6, 9->7).
    s = 10
    k = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1).repeat(1, 1, 1, 4).to(device)
    v = (-k).clone()
    ops.compact_kv_([k], [v], torch.tensor([4], device=device), torch.tensor([[0, 2, 3, 5]], device=device), torch.tensor([3], device=device))
    assert k[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 7, 9, 8, 9]
    assert v[0, 0, :, 0].tolist() == [-0.0, -1, -2, -3, -4, -6, -7, -9, -8, -9]


def test_many_layers_one_call(device):
    # More layers than one CUDA launch takes (128) still compacts them all.
    gen = torch.Generator().manual_seed(5)
    run_case(device, 130, 2, 1, 8, 6, torch.float16, gen)


def test_update_lens_in_place(device):
    k = [torch.zeros(2, 1, 20, 4, device=device)]
    v = [torch.zeros(2, 1, 20, 4, device=device)]
    lens = torch.tensor([3, 5], device=device)
    out = ops.compact_kv_(k, v, lens, torch.tensor([[0, 1, -1], [0, -1, -1]], device=device), torch.tensor([1, 0], device=device), update_lens=True)
    assert out is lens and lens.tolist() == [5, 6]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(1, 40),
    p=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_compaction_equals_gather(b, n, p, seed):
    gen = torch.Generator().manual_seed(seed)
    run_case("cpu", 2, b, 2, 8, n, torch.float32, gen, p=min(p, n))
