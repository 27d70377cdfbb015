"""vispec.ops.linear (the few-row CPU linear) and few_row_linears, the routing that the engine uses."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vispec import ops
from vispec.linear import MAX_ROWS, few_row_linears

from test_verify import seeded

needs_avx512 = pytest.mark.skipif(not ops.cpu_has_avx512(), reason="the routing is off without the AVX-512 body")


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 12, 13, 32, 41])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 100, 576])
def test_matches_float64(m, k):
    gen = seeded(f"linear{m}-{k}")
    for n, bias in [(1, False), (3, True), (4, False), (5, True), (19, True)]:
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        got = ops.linear(x, w, b)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        # fp32 accumulation over k terms of size ~1: a few ulps of sqrt(k)
        torch.testing.assert_close(got.double(), want, atol=1e-5 * k**0.5, rtol=1e-5)


def test_leading_dims_and_strided_inputs():
    gen = seeded("linear-views")
    x = torch.randn(2, 13, 40, generator=gen)
    w = torch.randn(24, 40, generator=gen)
    assert torch.equal(ops.linear(x, w), ops.linear(x.reshape(26, 40), w).reshape(2, 13, 24))
    xt = torch.randn(40, 7, generator=gen).t()  # last dimension not contiguous
    torch.testing.assert_close(ops.linear(xt, w), F.linear(xt, w), atol=1e-5, rtol=1e-5)
    wide = torch.randn(24, 64, generator=gen)[:, :40]  # a weight whose rows are 64 apart
    torch.testing.assert_close(ops.linear(x, wide), F.linear(x, wide), atol=1e-5, rtol=1e-5)
    assert ops.linear(torch.randn(0, 40), w).shape == (0, 24)


def test_each_row_is_bit_identical_whatever_the_rows_beside_it():
    """Why the kernel is safe for lossless decoding: a verified row gets the very bits a one-row decode gets,
    whatever the number of rows, their order or the thread count (tiles of 6 rows, blocks of 4 outputs)."""
    gen = seeded("linear-invariance")
    k, n = 577, 203
    x = torch.randn(23, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen)
    alone = torch.cat([ops.linear(x[i:i + 1], w, b) for i in range(len(x))])
    assert torch.equal(ops.linear(x, w, b), alone)
    perm = torch.randperm(len(x), generator=gen)
    assert torch.equal(ops.linear(x[perm], w, b), alone[perm])
    for rows in (5, 7, 13):
        assert torch.equal(ops.linear(x[:rows], w, b), alone[:rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.linear(x, w, b), alone)
    finally:
        torch.set_num_threads(threads)
    # and the outputs are split per weight row too: any slice of W gives the same columns
    assert torch.equal(ops.linear(x, w[37:150], b[37:150]), alone[:, 37:150])


def test_portable_body_gives_the_same_bits():
    """VISPEC_NO_AVX512=1 forces the portable body (as on a CPU without AVX-512): it follows the vector body's
    order of operations, so both give the same bits, tails, signed zeros and non-finite values included."""
    code = """
import torch
from vispec import ops
g = torch.Generator().manual_seed(3)
out = []
for m, k, n in [(13, 576, 37), (1, 17, 5), (7, 3, 4), (6, 100, 9)]:
    x = torch.randn(m, k, generator=g); w = torch.randn(n, k, generator=g); b = torch.randn(n, generator=g)
    x[0, 0] = float("inf") if k > 3 else x[0, 0]
    out += [ops.linear(x, w, b), ops.linear(x, w), ops.linear(-0.0 * x[:, 1:], w[:, 1:])]
torch.save(out, "{path}")
"""
    got = []
    for i, env in enumerate(({}, {"VISPEC_NO_AVX512": "1"})):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vispec-linear-{os.getpid()}-{i}.pt")
        r = subprocess.run([sys.executable, "-c", code.format(path=path)], env={**os.environ, **env},
                           capture_output=True, text=True)
        assert r.returncode == 0, (env, r.stderr[-2000:])
        got.append(torch.load(path))
        os.remove(path)
    assert got[0][0].isinf().any() and (got[0][2] == 0).any()  # infinities and zeros were exercised
    for a, b in zip(*got):
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()) and torch.equal(a.isinf(), b.isinf())
        assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))  # the bits, signed zeros too


@pytest.mark.parametrize("call, msg", [
    (lambda x, w, b: torch.ops.vispec.linear(x.double(), w, b), "must be float32"),
    (lambda x, w, b: torch.ops.vispec.linear(x, w[:, :-1], b), "input features"),
    (lambda x, w, b: torch.ops.vispec.linear(x, w, b[:-1]), "bias must have shape"),
    (lambda x, w, b: torch.ops.vispec.linear(x, w, b.double()), "bias must be float32"),
    (lambda x, w, b: torch.ops.vispec.linear(x[None], w, b), "x must have shape"),
    (lambda x, w, b: torch.ops.vispec.linear(x, w.t().contiguous().t(), b), "contiguous in their last"),
])
def test_errors(call, msg):
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with pytest.raises(RuntimeError, match=msg):
        call(x, w, b)


def test_opcheck():
    torch.library.opcheck(torch.ops.vispec.linear, (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)))
    torch.library.opcheck(torch.ops.vispec.linear, (torch.randn(3, 8), torch.randn(5, 8), None))


class WithOwnForward(nn.Linear):
    pass


@needs_avx512
def test_routing_is_scoped_and_exact():
    gen = seeded("linear-routing")
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 24, bias=False), WithOwnForward(24, 8))
    hooked = nn.Linear(8, 8)
    hooked.forward = lambda x: x  # accelerate-style instance forward: not ours to replace
    model.append(hooked)
    plain = [m for m in model if type(m) is nn.Linear and m is not hooked]
    x = torch.randn(5, 40, generator=gen)
    before = model(x)
    half = nn.Linear(8, 8).bfloat16()
    with torch.inference_mode(), few_row_linears(model, plain[0], half) as n:
        assert n == 2  # the two plain layers, once each; the subclass, the hooked and the bf16 layers are left alone
        h = plain[0](x)
        assert torch.equal(h, ops.linear(x, plain[0].weight, plain[0].bias))
        many = torch.randn(MAX_ROWS + 1, 40, generator=gen)  # above the limit: torch's own call
        assert torch.equal(plain[0](many), F.linear(many, plain[0].weight, plain[0].bias))
        inside = model(x)
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)
    assert all("forward" not in m.__dict__ for m in plain) and "forward" in hooked.__dict__
    assert torch.equal(model(x), before)


@needs_avx512
def test_routing_leaves_autograd_to_torch():
    layer = nn.Linear(16, 4)
    x = torch.randn(3, 16, requires_grad=True)
    with few_row_linears(layer):
        layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_routing_does_nothing_without_the_vector_body():
    code = """
import torch
from vispec.linear import few_row_linears
with few_row_linears(torch.nn.Linear(4, 4)) as n:
    print(n)
"""
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VISPEC_NO_AVX512": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]


@needs_avx512
def test_generate_runs_the_target_and_drafter_linears_on_the_kernel(monkeypatch):
    """The engine's use of the routing: inside vispec.generate the tree forwards' linears reach the kernel (the
    target's and the drafter's), the output is still model.generate's, and the layers are restored after."""
    import tiny_models as T
    import vispec
    import vispec.linear as vl
    from vispec.drafters import TreeConfig

    model = T.llama()
    inputs = T.text_inputs([7], seed=1)
    ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    drafter = vispec.EagleDrafter.from_target(model, seed=0)
    calls = []
    real = vl.ops.linear
    monkeypatch.setattr(vl.ops, "linear", lambda x, w, b=None: calls.append(w) or real(x, w, b))
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=16, tree=TreeConfig(10, 3, 4))
    assert torch.equal(out.sequences, ref)
    target_w = {id(m.weight) for m in model.modules() if type(m) is nn.Linear}
    drafter_w = {id(m.weight) for m in drafter.modules() if type(m) is nn.Linear} - target_w
    used = {id(w) for w in calls}
    assert used & target_w and used & drafter_w
    assert all("forward" not in m.__dict__ for m in [*model.modules(), *drafter.modules()])
