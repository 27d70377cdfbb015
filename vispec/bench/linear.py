"""The few-row CPU linear (``vispec.ops.linear``) against ``F.linear`` at the shapes decoding meets.

    vispec bench linear                   # the demo LM's and a 7B LM's layers, 1..104 rows
    vispec bench linear --rows 1 13 --smoke

Each shape runs over enough distinct weight matrices (``--mb`` MB in all) that the weights come from
DRAM, as they do in a model's forward; F.linear and vispec are timed in turn (A B A B ..., medians),
so their ratio holds on a drifting machine. Writes <results>/<cpu>-linear.md and a PNG plot; the
``MAX_ROWS`` limit of ``vispec.linear`` comes from where the ratio falls below 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vispec import ops
from vispec.bench import results_dir
from vispec.bench.kernels import copy_bandwidth, device_label, time_interleaved
from vispec.linear import MAX_ROWS

# (name, out_features, in_features): SmolLM2-135M (the demo's LM) and a LLaVA-7B / Llama-2-7B layer
SHAPES = [
    ("SmolLM2-135M q,o", 576, 576),
    ("SmolLM2-135M k,v", 192, 576),
    ("SmolLM2-135M gate,up", 1536, 576),
    ("SmolLM2-135M down", 576, 1536),
    ("SmolLM2-135M lm_head", 49152, 576),
    ("7B q,k,v,o", 4096, 4096),
    ("7B gate,up", 11008, 4096),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 13, 16, 24, 32, 48, 64, 104])
    ap.add_argument("--mb", type=float, default=256.0, help="MB of distinct weights per shape (DRAM-resident)")
    ap.add_argument("--smoke", action="store_true", help="two small shapes, few rows (CI: the script cannot rot)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default <results>/<cpu>-linear.md)")
    args = ap.parse_args(argv)
    if not ops.cpu_has_avx512():
        print("this CPU has no AVX-512: vispec.ops.linear runs its portable body, which the engine does not use")
    shapes = SHAPES[:2] if args.smoke else SHAPES
    rows = [1, 13] if args.smoke else args.rows
    mb = 8.0 if args.smoke else args.mb
    device = torch.device("cpu")
    label = device_label(device)
    roof = copy_bandwidth(device)
    head = ["layer", "N x K", "rows", "F.linear us", "vispec us", "speedup", "vispec GB/s", "vispec GFLOP/s"]
    lines = [f"# Few-row linear layers on {label}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; copy bandwidth {roof:.1f} GB/s. "
             f"Per shape, {mb:g} MB of distinct weights are cycled so that they come from DRAM as in a forward; "
             "times are per matrix (median, F.linear and vispec in turn). GB/s counts the weights once. "
             f"The engine routes calls of at most MAX_ROWS = {MAX_ROWS} rows to vispec.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines))
    results = {}
    for name, n, k in shapes:
        count = max(1, int(mb * 1e6 / (n * k * 4)))
        ws = [torch.randn(n, k) for _ in range(count)]
        for r in rows:
            x = torch.randn(r, k)
            t_ref, t_ours = time_interleaved([lambda: [F.linear(x, w) for w in ws],
                                              lambda: [ops.linear(x, w) for w in ws]], device, min_time=0.3, max_reps=20)
            t_ref, t_ours = t_ref / count, t_ours / count
            results.setdefault(name, []).append((r, t_ref / t_ours))
            cells = [name, f"{n} x {k}", r, f"{t_ref * 1e6:.0f}", f"{t_ours * 1e6:.0f}", f"{t_ref / t_ours:.2f}x",
                     f"{n * k * 4 / t_ours / 1e9:.1f}", f"{2 * r * n * k / t_ours / 1e9:.0f}"]
            line = "| " + " | ".join(str(c) for c in cells) + " |"
            lines.append(line)
            print(line, flush=True)
        del ws
    out = args.out or results_dir() / f"{label}-linear.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if _plot(results, png, label):
        lines += ["", f"![speedup over F.linear against rows]({png.name})"]
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}")
    return 0


def _plot(results, path, label) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in results.items():
        ax.plot([r for r, _ in pts], [s for _, s in pts], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axvline(MAX_ROWS, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (batch x tree nodes)")
    ax.set_ylabel("speedup over F.linear")
    ax.set_title(f"vispec.ops.linear, fp32, {label}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
