"""The bounds behind the CPU kernel table: what this CPU can do at best, measured the same way.

    python benchmarks/cpu_bounds.py          # writes benchmarks/results/cpu-bounds-<cpu>.md

- GEMM peak: a large torch.mm (MKL / oneDNN) in fp32 and bf16 -- the most FLOP/s the cores deliver.
  tree_attention at N >= 30 is compute-bound: its FLOPs (4 * B * Hq * N * (prefix + N) * D) over this
  peak is a floor on its time, and "1.5x SDPA" is only reachable where SDPA runs below peak / 1.5.
- Per shape of the kernel table (`<results>/<cpu>.md`, from `vispec bench kernels --device cpu --full`): the
  floor of tree_attention's time, max(bytes / copy bandwidth, FLOPs / GEMM peak), and how much of it a
  kernel 1.5x faster than SDPA+mask would need (over 100%: 1.5x is out of reach on this CPU at that shape).
- verify_sampling's fixed cost: the op on a tiny vocabulary (everything but the row scan), and the
  cost per visited row at a 152k vocabulary, so a B=1 call that visits one row can be split into the two.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vispec import ops  # noqa: E402
from vispec.bench import results_dir  # noqa: E402
from vispec.bench.kernels import MODELS, copy_bandwidth, device_label, sdpa_with_mask  # noqa: E402


def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def gemm_peak(dtype, n=2048):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), 5) / 1e9


def sampling_costs():
    out = {}
    for v in (1024, 152064):
        logits = (torch.randn(1, 8, v) * 4).bfloat16()
        parents = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1]])
        tokens = torch.full((1, 8), 5)  # never accepted: one row visited
        gen = torch.Generator().manual_seed(0)
        out[v] = timed(lambda: ops.verify_sampling(logits, tokens, parents, temperature=0.8, top_k=50, top_p=0.95,
                                                   generator=gen, max_accept=3), 300)
    return out


def attention_rate(dtype, hq=32, hkv=32, d=128, b=1, n=60, prefix=1024):
    q = torch.randn(b, n, hq, d).to(dtype)
    k = torch.randn(b, hkv, prefix + n, d).to(dtype)
    v = torch.randn_like(k)
    lens = torch.full((b,), prefix)
    parents = torch.tensor([-1] + [max(0, (i - 1) // 4) for i in range(1, n)]).expand(b, n)
    mb = ops.tree_mask_from_parents(parents[:1].contiguous())
    mask = ops.pack_tree_mask(mb)
    flops = 4 * b * hq * n * (prefix + n) * d
    return (flops / timed(lambda: ops.tree_attention(q, k, v, lens, mask), 5) / 1e9,
            flops / timed(lambda: sdpa_with_mask(q, k, v, lens, mb), 5) / 1e9)


def shape_floors(table: Path, peak: float, roof: float) -> list[str]:
    """Rows of the floor table for every tree_attention row of the kernel table ``table``. ``peak``: the
    FLOP/s bound (the best GEMM rate in either dtype: a CPU without bf16 instructions computes bf16 in
    fp32), ``roof``: bytes/s of a copy."""
    heads = {m.name: (m.q_heads, m.head_dim) for m in MODELS}
    text = table.read_text().split("## tree_attention", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    head, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(head)}
    out = ["| model | B | N | prefix | dtype | floor us (bound) | SDPA+mask us | vispec vs SDPA | 1.5x SDPA needs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in body:
        if len(r) != len(head) or r[col["vispec us"]] in ("-", "out of memory"):
            continue
        hq, d = heads[r[col["model"]]]
        b, n, prefix = int(r[col["B"]]), int(r[col["N"]]), int(r[col["prefix"]])
        flops = 4 * b * hq * n * (prefix + n) * d
        t_mem, t_flop = float(r[col["MB"]]) * 1e6 / roof, flops / peak
        floor = max(t_mem, t_flop)
        sdpa = float(r[col["SDPA+mask us"]]) * 1e-6
        need = floor / (sdpa / 1.5)
        out.append(f"| {r[col['model']]} | {b} | {n} | {prefix} | {r[col['dtype']]} | {floor * 1e6:.0f} "
                   f"({'memory' if t_mem >= t_flop else 'compute'}) | {sdpa * 1e6:.0f} | {r[col['vs SDPA']]} | "
                   f"{need:.0%} of the floor's rate{' (out of reach)' if need > 1 else ''} |")
    return out


def main() -> int:
    label = device_label(torch.device("cpu"))
    lines = [f"# CPU bounds on {label}", "", f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| quantity | fp32 | bf16 |", "|---|---|---|"]
    peaks = {dt: gemm_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    lines.append(f"| GEMM peak (2048^3 torch.mm), GFLOP/s | {peaks[torch.float32]:.0f} | {peaks[torch.bfloat16]:.0f} |")
    rates = {dt: attention_rate(dt) for dt in (torch.float32, torch.bfloat16)}
    lines.append("| tree_attention LLaVA-7B B=1 N=60 prefix 1024, GFLOP/s (vispec / SDPA+mask) | "
                 + " | ".join(f"{rates[dt][0]:.0f} / {rates[dt][1]:.0f}" for dt in (torch.float32, torch.bfloat16)) + " |")
    lines.append("| 1.5x SDPA there needs, GFLOP/s | "
                 + " | ".join(f"{1.5 * rates[dt][1]:.0f} ({1.5 * rates[dt][1] / peaks[dt]:.0%} of peak)"
                              for dt in (torch.float32, torch.bfloat16)) + " |")
    cost = sampling_costs()
    row_bytes = 152064 * 2
    per_row = cost[152064] - cost[1024]
    lines += ["", "| verify_sampling (bf16, top-k 50, top-p 0.95, one visited row) | us |", "|---|---|",
              f"| whole call at V = 1024 (fixed cost: dispatch, checks, uniforms, outputs) | {cost[1024] * 1e6:.1f} |",
              f"| whole call at V = 152064 | {cost[152064] * 1e6:.1f} |",
              f"| the row's own cost (difference): {row_bytes / 1e3:.0f} KB at {row_bytes / per_row / 1e9:.1f} GB/s "
              f"| {per_row * 1e6:.1f} |"]
    table = results_dir() / f"{label}.md"
    if table.is_file():
        roof = copy_bandwidth(torch.device("cpu")) * 1e9
        lines += ["", f"## tree_attention: the floor at each shape of `{table.name}`", "",
                  f"Floor = max(bytes / {roof / 1e9:.1f} GB/s (a copy), FLOPs / {max(peaks.values()):.0f} GFLOP/s (the "
                  "best GEMM)); the last column is the floor over the time of a kernel 1.5x faster than SDPA+mask, i.e. "
                  "the share of this CPU's bound such a kernel would have to reach.", ""]
        lines += shape_floors(table, max(peaks.values()) * 1e9, roof)
    out = results_dir() / f"cpu-bounds-{label}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
