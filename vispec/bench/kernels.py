"""Microbenchmarks of vispec's ops at the shapes of real VLMs.

    vispec bench kernels          # CUDA if available, else CPU (reduced grid)
    vispec bench kernels --full   # the whole grid, also on CPU (slow)
    vispec bench kernels --device cpu --ops tree_attention

Prints one markdown table per op and writes them to <results>/<device>.md.

Bytes moved (the "bytes" column, counted once each, caches assumed cold):
  tree_attention   q + out (2*B*N*Hq*D) + K and V of every visible position
                   (2*B*Hkv*(prefix+N)*D), elements of the input dtype (--attn-dtypes).
  verify_greedy    the whole logits tensor B*N*V (every row's argmax is needed).
  verify_sampling  the logits rows the walk visits, B*(accepted+1)*V, once each (the
                   top-k / top-p threshold passes re-read them from cache).
  chain_sampling   per row, the residual row of p and q (2*V) plus scalars, fp32.
  compact_kv       read + write of every moved entry: 2 * layers * 2(K,V) * B * Hkv *
                   accepted * D (cost is independent of the prefix length).
The roofline is the measured bandwidth of a large device-to-device copy on this
machine, so "% roof" = achieved GB/s / copy GB/s.

Baselines: "ref" is the pure-PyTorch reference of vispec.reference (vectorised
where that is what a PyTorch user would write: greedy uses argmax + a vectorised
tree walk, compaction uses per-layer advanced indexing); attention is also compared
with SDPA given an explicit boolean mask. Python-loop references (sampling walks)
are timed only where they finish in reasonable time, otherwise shown as "-".
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vispec import ops
from vispec.reference import (
    chain_speculative_sampling_ref,
    tree_attention_ref,
    verify_sampling_ref,
)

from vispec.bench import results_dir


@dataclass(frozen=True)
class Model:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int


MODELS = [
    Model("LLaVA-1.6-7B", 32, 32, 128, 32064, 32),
    Model("Qwen2.5-VL-7B", 28, 4, 128, 152064, 28),
]
TREE_DEPTH = {8: 3, 30: 4, 60: 6}  # depth of an EAGLE-2 style tree with N nodes


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, min_time=0.2, max_reps=200):
    """Median seconds per call after a warm-up, repeated until min_time has passed."""
    return time_interleaved([fn], device, min_time, max_reps)[0]


def time_interleaved(fns, device, min_time=0.2, max_reps=200):
    """Median seconds per call of each of ``fns``, run in turn within every repetition (A B A B ...), so that a
    shared machine's drift slows them alike and their ratio holds; after one warm-up call each."""
    for fn in fns:
        fn()
    sync(device)
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_reps and (time.perf_counter() - start < min_time or len(times[0]) < 3):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device):
    """GB/s of a large copy (read + write), the practical memory roofline."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * n * 4 / t / 1e9


def device_label(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + (platform.processor() or platform.machine())
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = "cpu-" + line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


# ---------------------------------------------------------------------------
# Baselines that a PyTorch user would write
# ---------------------------------------------------------------------------
def sdpa_with_mask(q, k, v, lens, tree_mask_bool):
    b, n, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    pos = torch.arange(s, device=q.device)
    rel = (pos.view(1, 1, s) - lens.view(b, 1, 1)).clamp(0, n - 1)
    in_tree = (pos.view(1, 1, s) >= lens.view(b, 1, 1)) & (pos.view(1, 1, s) < lens.view(b, 1, 1) + n)
    vis = (pos.view(1, 1, s) < lens.view(b, 1, 1)) | (in_tree & torch.gather(tree_mask_bool.expand(b, n, n), 2, rel.expand(b, n, s)))
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=vis.unsqueeze(1), enable_gqa=hq != hkv
    ).transpose(1, 2)


def verify_greedy_torch(logits, tokens, parents, depth):
    """argmax of every row + a vectorised walk (EAGLE style): no host sync per node."""
    amax = logits.argmax(-1)  # (B, N)
    par = parents.clamp(min=0)
    match = tokens == torch.gather(amax, 1, par)  # node's token equals its parent's argmax
    match[:, 0] = True
    ok = torch.ones_like(match)
    dep = torch.zeros_like(par)
    anc = torch.arange(parents.shape[1], device=parents.device).expand_as(par)
    for _ in range(depth):  # accepted iff the node and all its ancestors match
        ok &= torch.gather(match, 1, anc)
        dep += (anc != 0).long()
        anc = torch.gather(par, 1, anc)
    best = torch.where(ok, dep, -1).argmax(-1, keepdim=True)  # deepest accepted node
    return best, torch.gather(amax, 1, best)


def compact_kv_torch(k_caches, v_caches, lens, path, alen):
    b = lens.shape[0]
    p = path.shape[1]
    rows = torch.arange(b, device=lens.device).unsqueeze(1).expand(b, p)
    valid = torch.arange(p, device=lens.device).unsqueeze(0) <= alen.unsqueeze(1)
    src = torch.where(valid, lens.unsqueeze(1) + path.clamp(min=0), lens.unsqueeze(1))
    dst = torch.where(valid, lens.unsqueeze(1) + torch.arange(p, device=lens.device), lens.unsqueeze(1))
    for c in (*k_caches, *v_caches):
        moved = c[rows, :, src]  # gather first: overlapping ranges are safe
        c[rows, :, dst] = moved


# ---------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------
def fmt_t(t):
    return "-" if t is None else (f"{t * 1e6:.1f}" if t < 1e-2 else f"{t * 1e6:.0f}")


def row(model, b, n, prefix, t, nbytes, roof, ref=None, extras=()):
    gbs = nbytes / t / 1e9
    cells = [model, b, n, prefix, fmt_t(t), f"{nbytes / 1e6:.2f}", f"{gbs:.1f}", f"{100 * gbs / roof:.0f}%"]
    cells += [fmt_t(ref), "-" if ref is None else f"{ref / t:.1f}x"]
    for x in extras:  # further baselines: time and vispec's speedup over it
        cells += [fmt_t(x), "-" if x is None else f"{x / t:.1f}x"]
    return cells


def has_flashinfer(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flashinfer  # noqa: F401
        return True
    except Exception:  # not installed, or built for another torch / CUDA
        return False


def attention_baselines(device) -> list[str]:
    """Baseline columns of the tree_attention table: SDPA with an explicit mask everywhere; on CUDA also
    vispec's SIMT kernel (the pre-tensor-core path, forced by VISPEC_TREE_ATTENTION_KERNEL=simt) and
    flashinfer's custom-mask prefill when ``import flashinfer`` works."""
    cols = ["SDPA+mask"]
    if device.type == "cuda":
        cols.append("vispec SIMT")
    if has_flashinfer(device):
        cols.append("flashinfer")
    return cols


# Baseline columns of the other tables (their bench functions fill these keys).
BASELINES = {"chain_speculative_sampling": lambda device: ["flashinfer"] if has_flashinfer(device) else []}


def flashinfer_tree_attention(q, k, v, lens, mask_bool):
    """A closure running flashinfer's ragged-KV prefill with a custom mask over the same inputs (the cache
    copied once to flashinfer's NHD layout, outside the timing), or None when flashinfer refuses them."""
    import flashinfer

    b, n, hq, d = q.shape
    hkv = k.shape[1]
    kv_len = [int(x) + n for x in lens.tolist()]
    ks = torch.cat([k[i, :, :kv_len[i]].transpose(0, 1) for i in range(b)])  # (sum kv, Hkv, D)
    vs = torch.cat([v[i, :, :kv_len[i]].transpose(0, 1) for i in range(b)])
    qs = q.reshape(b * n, hq, d)
    # request i's mask (N, kv_len): every prefix key visible, then the tree mask
    masks = [torch.cat([torch.ones(n, kv_len[i] - n, dtype=torch.bool, device=q.device),
                        mask_bool[0 if mask_bool.shape[0] == 1 else i]], 1).flatten() for i in range(b)]
    qo_indptr = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
    kv_indptr = torch.tensor([0] + kv_len, dtype=torch.int32, device=q.device).cumsum(0, dtype=torch.int32)
    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=q.device)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    w.plan(qo_indptr, kv_indptr, hq, hkv, d, custom_mask=torch.cat(masks), q_data_type=q.dtype)
    return lambda: w.run(qs, ks, vs)


def forced_simt(fn):
    """fn run with the CUDA tree attention forced onto its SIMT kernel (read by the launcher on every call)."""
    def run():
        old = os.environ.get("VISPEC_TREE_ATTENTION_KERNEL")
        os.environ["VISPEC_TREE_ATTENTION_KERNEL"] = "simt"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["VISPEC_TREE_ATTENTION_KERNEL"]
            else:
                os.environ["VISPEC_TREE_ATTENTION_KERNEL"] = old
    return run


def bench_tree_attention(m, b, n, prefix, device, args, dtype=torch.bfloat16):
    s = prefix + n
    q = torch.randn(b, n, m.q_heads, m.head_dim, device=device, dtype=dtype)
    k = torch.randn(b, m.kv_heads, s, m.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.full((b,), prefix, dtype=torch.int64, device=device)
    parents = torch.tensor([-1] + [max(0, (i - 1) // 4) for i in range(1, n)], device=device).expand(b, n)
    mask_bool = ops.tree_mask_from_parents(parents[:1].contiguous())
    mask = ops.pack_tree_mask(mask_bool)
    e = q.element_size()
    nbytes = 2 * b * n * m.q_heads * m.head_dim * e + 2 * b * m.kv_heads * s * m.head_dim * e
    attend = lambda: ops.tree_attention(q, k, v, lens, mask)  # noqa: E731
    if not args.ref:
        return time_fn(attend, device), nbytes, None, {}
    extras = {}
    # SDPA interleaved with vispec: the ratio is the table's point
    t, extras["SDPA+mask"] = time_interleaved([attend, lambda: sdpa_with_mask(q, k, v, lens, mask_bool)], device,
                                              min_time=0.4)
    ref = time_fn(lambda: tree_attention_ref(q, k, v, lens, mask_bool), device, min_time=0.05, max_reps=5)
    if device.type == "cuda":
        extras["vispec SIMT"] = time_fn(forced_simt(attend), device)
        try:
            extras["flashinfer"] = time_fn(flashinfer_tree_attention(q, k, v, lens, mask_bool), device)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is shown as "-", with why
            if "flashinfer" in attention_baselines(device):
                tqdm.write(f"flashinfer baseline failed at B={b} N={n} prefix={prefix}: {e}", file=sys.stderr)
    return t, nbytes, ref, extras


def make_verify_inputs(m, b, n, device, dtype=torch.bfloat16):
    logits = torch.randn(b, n, m.vocab, device=device, dtype=dtype)
    depth = TREE_DEPTH[n]
    parents = torch.tensor([-1] + [max(0, (i - 1) // 4) for i in range(1, n)], device=device).expand(b, n).contiguous()
    amax = logits.argmax(-1)
    tokens = torch.gather(amax, 1, parents.clamp(min=0))  # every draft matches: longest walk
    return logits, tokens, parents, depth


def bench_verify_greedy(m, b, n, prefix, device, args):
    logits, tokens, parents, depth = make_verify_inputs(m, b, n, device)
    nbytes = logits.numel() * logits.element_size()
    t = time_fn(lambda: ops.verify_greedy(logits, tokens, parents, depth), device)
    ref = time_fn(lambda: verify_greedy_torch(logits, tokens, parents, depth), device) if args.ref else None
    return t, nbytes, ref, {}


def bench_verify_sampling(m, b, n, prefix, device, args):
    logits, tokens, parents, depth = make_verify_inputs(m, b, n, device)
    logits.mul_(4)  # peaked rows, so drafts get accepted as in real decoding
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(temperature=0.8, top_k=50, top_p=0.95, max_accept=depth)
    path, alen, _ = ops.verify_sampling(logits, tokens, parents, generator=gen, **kw)
    nbytes = int((alen + 1).sum()) * m.vocab * logits.element_size()
    t = time_fn(lambda: ops.verify_sampling(logits, tokens, parents, generator=gen, **kw), device)
    ref = None
    if args.ref and b == 1 and m.vocab <= 40000:
        u = torch.rand(b, n, dtype=torch.float64, device=device)
        lc, tc, pc, uc = logits.cpu(), tokens.cpu(), parents.cpu(), u.cpu()
        ref = time_fn(lambda: verify_sampling_ref(lc, tc, pc, uc, **kw), torch.device("cpu"), min_time=0.0, max_reps=1)
    return t, nbytes, ref, {}


def bench_chain(m, b, n, prefix, device, args):
    k = TREE_DEPTH[n]
    q = torch.softmax(torch.randn(b, k, m.vocab, device=device), -1)
    p = torch.softmax(torch.randn(b, k + 1, m.vocab, device=device), -1)
    tokens = torch.randint(0, m.vocab, (b, k), device=device)
    nbytes = b * 2 * m.vocab * 4
    gen = torch.Generator(device=device).manual_seed(0)
    t = time_fn(lambda: ops.chain_speculative_sampling(q, tokens, p, generator=gen), device)
    ref = None
    extras = {}
    if args.ref and b == 1:
        u = torch.rand(b, k + 1, dtype=torch.float64, device=device)
        qc, tc, pc, uc = q.cpu(), tokens.cpu(), p.cpu(), u.cpu()
        ref = time_fn(lambda: chain_speculative_sampling_ref(qc, tc, pc, uc), torch.device("cpu"), min_time=0.0, max_reps=3)
    if args.ref and has_flashinfer(device):
        import flashinfer

        ids = tokens.to(torch.int32)
        try:
            extras["flashinfer"] = time_fn(lambda: flashinfer.sampling.chain_speculative_sampling(q, ids, p), device)
        except Exception as e:  # noqa: BLE001 - shown as "-", with why
            tqdm.write(f"flashinfer chain sampling failed at B={b} N={n}: {e}", file=sys.stderr)
    return t, nbytes, ref, extras


def bench_compact(m, b, n, prefix, device, args):
    depth = TREE_DEPTH[n]
    base = 64
    s = base + n + 8
    dtype = torch.bfloat16
    buf = torch.randn(2, m.layers, b, m.kv_heads, s, m.head_dim, device=device, dtype=dtype)
    kc = list(buf[0].unbind(0))
    vc = list(buf[1].unbind(0))
    lens = torch.full((b,), base, dtype=torch.int64, device=device)
    # A path that skips nodes, so every accepted entry really moves: 0, 2, 4, ... (< N for every N used)
    path = torch.arange(0, 2 * depth + 1, 2, device=device).expand(b, -1).contiguous()
    alen = torch.full((b,), depth, dtype=torch.int64, device=device)
    nbytes = 2 * m.layers * 2 * b * m.kv_heads * depth * m.head_dim * 2
    t = time_fn(lambda: ops.compact_kv_(kc, vc, lens, path, alen), device)
    ref = time_fn(lambda: compact_kv_torch(kc, vc, lens, path, alen), device) if args.ref else None
    return t, nbytes, ref, {}


BENCHES = {
    "tree_attention": bench_tree_attention,
    "verify_greedy": bench_verify_greedy,
    "verify_sampling": bench_verify_sampling,
    "chain_speculative_sampling": bench_chain,
    "compact_kv": bench_compact,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="the whole grid (default on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="one small shape per model (CI: the script cannot rot)")
    ap.add_argument("--ops", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--no-ref", dest="ref", action="store_false", help="skip the baselines")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: by grid)")
    ap.add_argument("--prefixes", type=int, nargs="+", default=None, help="tree_attention prefix lengths (default: by grid)")
    ap.add_argument("--attn-dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"],
                    help="tree_attention input dtypes (one row each)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: the results folder, see vispec.bench.results_dir, /<device>.md)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not ops.cuda_built():
        sys.exit("vispec was built without CUDA kernels; reinstall with VISPEC_CUDA=1")
    full = (args.full or device.type == "cuda") and not args.smoke
    batches = args.batches or ([1] if args.smoke else [1, 8, 32] if full else [1, 8])
    prefixes = args.prefixes or ([128] if args.smoke else [1024, 4096] if full else [1024])
    trees = [8] if args.smoke else [8, 30, 60]
    roof = copy_bandwidth(device)
    label = device_label(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    lines = [
        f"# vispec kernel microbenchmarks on {label}",
        "",
        f"torch {torch.__version__}{threads}; memory roofline (measured copy) {roof:.1f} GB/s; "
        f"grid: B {batches}, N {trees}, prefix {prefixes}; times in microseconds (median).",
        "Bytes are counted as documented in vispec/bench/kernels.py; % roof compares with a DRAM copy, so it "
        "exceeds 100% when the data moved stays in the caches (small compactions on a CPU). tree_attention and "
        "SDPA+mask are timed in turn (A B A B ...), so their ratio holds when a shared machine drifts.",
        "",
    ]
    print("\n".join(lines))
    for op in args.ops:
        fn = BENCHES[op]
        attn = op == "tree_attention"
        header = ["model", "B", "N", "prefix"] + (["dtype"] if attn else []) + ["vispec us", "MB", "GB/s", "% roof",
                                                                            "ref us", "vs ref"]
        baselines = (attention_baselines(device) if attn else BASELINES.get(op, lambda d: [])(device)) if args.ref else []
        for c in baselines:
            header += [f"{c} us", f"vs {c.split('+')[0].removeprefix('vispec ')}"]
        table = [f"## {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        print("\n".join(table))
        grid = [(m, b, n, p, dt) for m in MODELS for b in batches for n in trees
                for p in (prefixes if attn else ["-"]) for dt in (args.attn_dtypes if attn else [None])]
        for m, b, n, p, dt in tqdm(grid, desc=op, file=sys.stderr, leave=False):
            try:
                kw = {"dtype": getattr(torch, dt)} if dt else {}
                t, nbytes, ref, extras = fn(m, b, n, p if p != "-" else 0, device, args, **kw)
                cells = row(m.name, b, n, p, t, nbytes, roof, ref, [extras.get(c) for c in baselines])
            except torch.OutOfMemoryError:
                cells = [m.name, b, n, p, "out of memory"] + [""] * (len(header) - 5)
            if dt:
                cells.insert(4, {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dt])
            line = "| " + " | ".join(str(c) for c in cells) + " |"
            table.append(line)
            tqdm.write(line, file=sys.stdout)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lines += table + [""]
    out = args.out or results_dir() / f"{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
