"""Small named op cases for scripts/gpu_check.sh: each is compared with vispec.reference (or the CPU op),
and is small enough to run under compute-sanitizer. Exit status 1 names the failing cases.

    python scripts/gpu_cases.py --device cuda            # all cases
    python scripts/gpu_cases.py --device cpu --list
    python scripts/gpu_cases.py --device cuda --errors   # bad input must come back as a Python RuntimeError

--errors probes the C++ error path of each op (a check that fails before any work): on an H200 the first
CUDA test expecting such an error died with a segfault instead, so the probe runs in a process of its own
and names each call before making it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from vispec import ops
from vispec.reference import compact_kv_ref, tree_attention_ref, verify_sampling_ref


def chain_tree(n, device):
    parents = torch.arange(-1, n - 1, device=device).view(1, n)
    return ops.pack_tree_mask(ops.tree_mask_from_parents(parents))


def attention_case(d, n, b, prefix, split_hint=False):
    def run(device):
        g = torch.Generator().manual_seed(d * 1000 + n)
        hq, hkv = 8, 2
        smax = prefix + n + 8
        q = torch.randn(b, n, hq, d, generator=g).to(device, torch.bfloat16)
        k = torch.randn(b, hkv, smax, d, generator=g).to(device, torch.bfloat16)
        v = torch.randn(b, hkv, smax, d, generator=g).to(device, torch.bfloat16)
        lens = torch.full((b,), prefix, dtype=torch.int64, device=device)
        mask = chain_tree(n, device).expand(b, -1, -1).contiguous()
        out = ops.tree_attention(q, k, v, lens, mask)
        dense = ops.tree_mask_from_parents(torch.arange(-1, n - 1, device=device).view(1, n)).expand(b, -1, -1)
        ref, _ = tree_attention_ref(q.float(), k.float(), v.float(), lens, dense)
        return torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)
    return run


def nan_key_case(device):
    """Issue 11 bug 3: a NaN key before any finite score poisons the row on every split count, as on the CPU."""
    b, n, h, d, prefix = 1, 4, 1, 64, 4096
    q = torch.ones(b, n, h, d, device=device)
    k = torch.zeros(b, h, prefix + n, d, device=device)
    v = torch.zeros(b, h, prefix + n, d, device=device)
    k[0, 0, 0, 0] = float("nan")
    lens = torch.full((b,), prefix, dtype=torch.int64, device=device)
    mask = chain_tree(n, device)
    out = ops.tree_attention(q, k, v, lens, mask)
    cpu = ops.tree_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu())
    return torch.equal(out.isnan().cpu(), cpu.isnan())


def sampling_case(device):
    g = torch.Generator().manual_seed(7)
    b, n, v = 2, 16, 32000
    logits = torch.randn(b, n, v, generator=g) * 3
    parents = torch.tensor([[-1, 0, 0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]] * b)
    tokens = logits.argsort(-1, descending=True)[:, :, 1].clone()
    tokens[:, 0] = 5
    u = torch.rand(b, n, generator=g, dtype=torch.float64)
    got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device), temperature=0.7, top_k=40,
                              top_p=0.9, uniforms=u.to(device))
    want = verify_sampling_ref(logits, tokens, parents, u, temperature=0.7, top_k=40, top_p=0.9)
    return all(torch.equal(a.cpu(), w) for a, w in zip(got, want))


def bug1_case(device):
    """Issue 11 bug 1: the last of 25 equally likely kept children is accepted; no excluded token comes out."""
    v = n = 26
    logits = torch.zeros(1, n, v)
    logits[..., 25] = -10.0
    tokens = torch.cat([torch.tensor([[3]]), torch.arange(25).view(1, 25)], 1)
    parents = torch.tensor([[-1] + [0] * 25])
    u = torch.full((1, n), 0.9999999, dtype=torch.float64)
    u[0, 0] = 0.5
    got = ops.verify_sampling(logits.to(device), tokens.to(device), parents.to(device), top_k=25, max_accept=1,
                              uniforms=u.to(device))
    return [int(t.flatten()[-1]) for t in got] == [25, 1, 12]


def compact_case(device):
    """compact_kv_ with overlapping source and destination ranges (accepted nodes just past the prefix)."""
    g = torch.Generator().manual_seed(3)
    b, h, s, d, layers = 2, 2, 64, 32, 3
    ks = [torch.randn(b, h, s, d, generator=g).to(device) for _ in range(layers)]
    vs = [torch.randn(b, h, s, d, generator=g).to(device) for _ in range(layers)]
    lens = torch.tensor([10, 20], device=device)
    path = torch.tensor([[0, 1, 3, 4], [0, 2, 5, -1]], device=device)
    alen = torch.tensor([3, 2], device=device)
    want_k, want_v = compact_kv_ref([k.cpu() for k in ks], [v.cpu() for v in vs], lens.cpu(), path.cpu(), alen.cpu())
    ops.compact_kv_(ks, vs, lens, path, alen)
    return all(torch.equal(a.cpu(), w) for a, w in zip(ks + vs, list(want_k) + list(want_v)))


def error_probes(device):
    """(name, call, message) per op: each call fails one input check of csrc/validate.cpp."""
    q = torch.randn(1, 4, 2, 64, device=device)
    kv = torch.randn(1, 2, 16, 64, device=device)
    lens = torch.tensor([10], device=device)
    mask = chain_tree(4, device)
    logits = torch.randn(1, 4, 50, device=device)
    tokens = torch.zeros(1, 4, dtype=torch.int64, device=device)
    parents = torch.tensor([[-1, 0, 1, 2]], device=device)
    path = torch.tensor([[0, 1]], device=device)
    alen = torch.tensor([1], device=device)
    return [
        ("tree_attention window < N", lambda: ops.tree_attention(q, kv, kv, lens, mask, window=3),
         "window must be 0"),
        ("verify_greedy max_accept > N - 1", lambda: ops.verify_greedy(logits, tokens, parents, max_accept=9),
         "max_accept must be in"),
        ("verify_sampling max_accept > N - 1", lambda: ops.verify_sampling(logits, tokens, parents, max_accept=9),
         "max_accept must be in"),
        ("compact_kv_ aliased caches (bug 4)", lambda: ops.compact_kv_([kv, kv], [kv.clone(), kv.clone()], lens, path, alen),
         "are the same memory"),
    ]


def probe_errors(device) -> list[str]:
    """Names of the probes whose call did not raise a RuntimeError with the expected message."""
    failed = []
    for name, call, message in error_probes(device):
        print(f"probe {name} ...", flush=True)
        try:
            call()
            got = "no error"
        except RuntimeError as e:
            got = None if message in str(e) else f"another message: {str(e).splitlines()[0]}"
        print(f"{'ok  ' if got is None else 'FAIL'} {name}" + ("" if got is None else f" ({got})"), flush=True)
        if got is not None:
            failed.append(name)
    return failed


CASES = {
    "tree_attention_d80_n64": lambda dev: attention_case(80, 64, 2, 512)(dev),
    "tree_attention_d128_n64": lambda dev: attention_case(128, 64, 2, 512)(dev),
    "tree_attention_split_b1_prefix4096": lambda dev: attention_case(128, 8, 1, 4096)(dev),
    "tree_attention_nan_key (bug 3)": nan_key_case,
    "verify_sampling_topk_topp_v32000": sampling_case,
    "verify_sampling_last_kept_child (bug 1)": bug1_case,
    "compact_kv_overlapping_paths": compact_case,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--errors", action="store_true", help="probe the ops' input checks instead of the cases")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.errors:
        failed = probe_errors(torch.device(args.device))
        if failed:
            print(f"{len(failed)} probe(s) failed: {', '.join(failed)}")
        return 1 if failed else 0
    failed = []
    for name, fn in CASES.items():
        if args.only and name.split(" ")[0] not in args.only:
            continue
        ok = bool(fn(torch.device(args.device)))
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
        if not ok:
            failed.append(name)
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
