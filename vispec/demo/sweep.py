"""The image-token sweep: the same recipe at several image-token counts, so that tau and speedup can be
plotted against the number of image tokens per drafter kind (the ViSpec paper's Section 4.1 argument,
measured).

    python -m vispec.demo.sweep --work /tmp/sweep                      # 36, 144, 576 tokens; hours on a CPU
    python -m vispec.demo.sweep --work /tmp/sweep --max-minutes 150    # one session's chunk; re-run to continue

For each image-token count N, in order, each step skipped when its output exists (so the command resumes):

1. vision weights: the package's for N (``vispec/demo/weights/vision[-N].safetensors``) when their
   metadata marks them complete, else ``python -m vispec.demo.train_vision --image-tokens N --resume``
   trains (or finishes) them there, checkpointed;
2. drafters: ``python -m vispec.demo.build_drafters`` with identical settings for every N, once per
   seed (``--seeds`` for the largest N, ``--other-seeds`` for the others);
3. benchmark: ``vispec bench e2e --suite demo --image-tokens N --drafters ...`` per seed (JSON);
4. ablations at the largest N, before the other counts (seed 0, the same data and settings, one part changed each, see
   ``ABLATIONS``): trained by build_drafters ``--variant``, benchmarked against the seed-0 drafters in
   one run (``--ablation-bench-args``);
5. the table and plot: ``benchmarks/results/demo-sweep-<device>.md`` / ``.png``, mean and min-max
   over seeds of tau and speedup per kind and temperature, and the ablation table.

Steps run as subprocesses (each one resumable on its own); ``--max-minutes`` stops before starting
a step once that much time has passed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import drafter_label, drafter_names
from .model import GEOMETRY, vision_weights_path, weights_metadata

ROOT = Path(__file__).resolve().parents[2]
# name -> what build_drafters trains differently (ViSpec's global feature and compressed-token count,
# HiViS's residual vectors and its stage-2 objective); everything else as the seed-0 drafters.
ABLATIONS = {
    "vispec-no-global": ("ViSpec without the global feature", ["--kinds", "vispec", "--no-global-feature"]),
    "vispec-4-tokens": ("ViSpec, 4 compressed tokens (not 1)", ["--kinds", "vispec", "--num-q", "5"]),
    "hivis-residuals": ("HiViS with 4 step residuals", ["--kinds", "hivis", "--hivis-residuals", "4"]),
    "hivis-stage2": ("HiViS with its own stage 2 (self-feedback, data selection)", ["--kinds", "hivis", "--stage2", "hivis"]),
}


def split_seeds(res: dict, seeds: list[int], work: Path) -> None:
    """A benchmark JSON over several seeds' drafters ("<kind>@<i>") -> bench-seed<seed>.json each, with the
    shared baselines (plain, lookup) in every one."""
    for i, seed in enumerate(seeds):
        per = {}
        for temp, methods in res["results"].items():
            per[temp] = {}
            for m, a in methods.items():
                kind, _, at = m.partition("@")
                if not at and len(seeds) > 1 and m not in ("plain", "lookup"):
                    continue
                if not at or int(at) == i:
                    per[temp][kind] = a
        pf = {k.partition("@")[0]: v for k, v in res.get("prefill_frac", {}).items()
              if "@" not in k or int(k.partition("@")[2]) == i}
        (work / f"bench-seed{seed}.json").write_text(json.dumps({**res, "results": per, "prefill_frac": pf}, indent=1))


def method_label(method: str) -> str:
    return "HF prompt lookup" if method == "lookup" else drafter_label(method)


def aggregate(runs: dict[int, list[dict]]) -> dict:
    """{tokens: [bench JSON per seed]} -> {temperature: {method: {tokens: (mean, min, max) of tau and speedup}}}."""
    out = {}
    for tokens, seeds in sorted(runs.items()):
        for res in seeds:
            for temp, methods in res["results"].items():
                for m, a in methods.items():
                    if m == "plain":
                        continue
                    slot = out.setdefault(temp, {}).setdefault(m, {}).setdefault(tokens, {"tau": [], "speedup": []})
                    if a["tau"] is not None:
                        slot["tau"].append(a["tau"])
                    slot["speedup"].append(a["speedup"])
    for methods in out.values():
        for per_tokens in methods.values():
            for tokens, vals in per_tokens.items():
                per_tokens[tokens] = {k: (sum(v) / len(v), min(v), max(v), len(v)) if v else None for k, v in vals.items()}
    return out


def ablation_report(res: dict, folders: list[str]) -> list[str]:
    """The ablation benchmark ("<kind>@<i>" = drafter kind from folder i) as a table per temperature."""
    named = {"drafters-seed0": "seed 0", **{f"ablation-{k}": v[0] for k, v in ABLATIONS.items()}}
    lines = ["## Ablations (largest image-token count, seed 0, one benchmark run)", "",
             "| temperature | drafter | trained as | tau | speedup |", "|---|---|---|---|---|"]
    for temp, methods in res["results"].items():
        for m, a in methods.items():
            kind, _, at = m.partition("@")
            if not at:
                continue
            tau = "-" if a["tau"] is None else f"{a['tau']:.2f}"
            lines.append(f"| {temp} | {method_label(kind)} | {named.get(folders[int(at)], folders[int(at)])} | {tau} | "
                         f"{a['speedup']:.2f}x |")
    return lines + [""]


def report(agg: dict, label: str) -> list[str]:
    lines = [f"# The image-token sweep on {label}", "",
             "Same recipe (vision training, data, drafter training, tree) at each image-token count; tau = accepted "
             "draft tokens per target forward (bonus excluded), speedup over model.generate in the same run. "
             "Cells: mean (min-max over seeds, n seeds).", ""]
    for temp, methods in agg.items():
        counts = sorted({t for per in methods.values() for t in per})
        lines += [f"## temperature {temp}", "", "| method | metric | " + " | ".join(f"{t} tokens" for t in counts) + " |",
                  "|---|---|" + "---|" * len(counts)]
        for m, per in methods.items():
            for metric in ("tau", "speedup"):
                cells = []
                for t in counts:
                    v = per.get(t, {}).get(metric)
                    unit = "x" if metric == "speedup" else ""
                    cells.append("-" if v is None else f"{v[0]:.2f}{unit} ({v[1]:.2f}-{v[2]:.2f}, {v[3]})")
                lines.append(f"| {method_label(m)} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(agg: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(agg)
    fig, axes = plt.subplots(len(temps), 2, figsize=(10, 3.6 * len(temps)), squeeze=False)
    for row, temp in enumerate(temps):
        for col, metric in enumerate(("speedup", "tau")):
            ax = axes[row][col]
            for m, per in agg[temp].items():
                pts = [(t, v[metric]) for t, v in sorted(per.items()) if v.get(metric)]
                if not pts:
                    continue
                xs = [t for t, _ in pts]
                mean = [v[0] for _, v in pts]
                err = [[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]]
                ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=method_label(m))
            ax.set_xscale("log")
            ax.set_xticks(sorted({t for per in agg[temp].values() for t in per}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("image tokens per image")
            ax.set_title(f"{metric} at T={temp}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"vispec on the demo VLM against image tokens ({label})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=sorted(GEOMETRY), choices=sorted(GEOMETRY))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="drafter seeds at the largest count")
    ap.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="drafter seeds at the other counts")
    ap.add_argument("--build-args", default="--samples 320 --sampled 160 --stage2-epochs 4 --draft-vocab-coverage 0.99",
                    help="extra arguments of build_drafters, the same for every count")
    ap.add_argument("--generations", type=int, nargs="+", choices=[2, 3], default=[2],
                    help="drafter heads trained at the largest count (the others: EAGLE-2 only)")
    ap.add_argument("--bench-args", default="--images 100 --batches 1 4 8 --text-only 6", help="extra bench_e2e arguments")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                    help="ablations trained and benchmarked at the largest count (none: skip)")
    ap.add_argument("--ablation-bench-args", default="--images 40 --depth-sweep 0 --prefill-pairs 0",
                    help="extra bench_e2e arguments of the ablation run")
    ap.add_argument("--max-minutes", type=float, default=0, help="> 0: start no step after this many minutes")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the benchmark JSON already in --work")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the table and plot go")
    args = ap.parse_args(argv)
    t0 = time.time()

    def out_of_time() -> bool:
        return bool(args.max_minutes) and time.time() - t0 > 60 * args.max_minutes

    def run(cmd: list[str]) -> int:
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc not in (0, 3):  # 3: a step stopped at its time limit, resumable
            raise SystemExit(f"step failed (exit {rc}): {' '.join(cmd)}")
        return rc

    py = sys.executable
    biggest = max(args.tokens)
    ablation_json = args.work / str(biggest) / "bench-ablations.json"
    folders = ["drafters-seed0"] + [f"ablation-{a}" for a in args.ablations]

    def run_ablations() -> None:
        """Step 4, once the largest count's seed-0 drafters are benchmarked (before the other counts)."""
        work = args.work / str(biggest)
        if not args.ablations or ablation_json.is_file() or not (work / "bench-seed0.json").is_file():
            return
        for a in args.ablations:
            out = work / f"ablation-{a}"
            if any((out / k / "config.json").is_file() for k in drafter_names([2])):
                continue
            if out_of_time():
                return
            run([py, "-m", "vispec.demo.build_drafters", "--work", str(work), "--image-tokens", str(biggest),
                 "--vision-weights", str(vision_weights_path(biggest)), "--out", str(out), "--seed", "0",
                 "--variant", a, "--generations", "2", *args.build_args.split(), *ABLATIONS[a][1]])
        if not out_of_time():
            run([py, "-m", "vispec.bench.e2e", "--suite", "demo", "--image-tokens", str(biggest), "--vision-weights",
                 str(vision_weights_path(biggest)), "--drafters", *[str(work / f) for f in folders],
                 "--out", str(work / "bench-ablations.md"), "--json", str(ablation_json),
                 *args.ablation_bench_args.split()])

    for n in [] if args.report_only else args.tokens:
        work = args.work / str(n)
        weights = vision_weights_path(n)  # trained (or finished) in the package: the one that ships
        if not (weights.is_file() and weights_metadata(weights).get("complete") == "1"):
            if out_of_time():
                break
            left = args.max_minutes - (time.time() - t0) / 60
            minutes = ["--max-minutes", f"{max(1.0, left):.0f}"] if args.max_minutes else []
            if run([py, "-m", "vispec.demo.train_vision", "--image-tokens", str(n), "--resume", "--out",
                    str(weights), "--bf16", *minutes]) == 3:
                break
        seeds = args.seeds if n == biggest else args.other_seeds
        gens = args.generations if n == biggest else [2]
        stopped = False
        for seed in seeds:
            drafters = work / f"drafters-seed{seed}"
            if not all((drafters / k / "config.json").is_file() for k in drafter_names(gens)):
                if out_of_time():
                    stopped = True
                    break
                run([py, "-m", "vispec.demo.build_drafters", "--work", str(work), "--image-tokens", str(n),
                     "--vision-weights", str(weights), "--out", str(drafters), "--seed", str(seed),
                     "--generations", *map(str, gens), *args.build_args.split()])
        results = [work / f"bench-seed{seed}.json" for seed in seeds]
        if not (stopped or all(r.is_file() for r in results) or out_of_time()):
            # One benchmark run for every seed's drafters: model.generate and prompt lookup are timed once,
            # each seed's drafters against the same baseline; then one JSON per seed.
            combined = work / "bench-all-seeds.json"
            run([py, "-m", "vispec.bench.e2e", "--suite", "demo", "--image-tokens", str(n), "--vision-weights",
                 str(weights), "--drafters", *[str(work / f"drafters-seed{s}") for s in seeds],
                 "--out", str(work / "bench-all-seeds.md"), "--json", str(combined), *args.bench_args.split()])
            split_seeds(json.loads(combined.read_text()), seeds, work)
        if n == biggest:
            run_ablations()
    runs = {}
    for n in args.tokens:
        found = sorted((args.work / str(n)).glob("bench-seed*.json"))
        if found:
            runs[n] = [json.loads(p.read_text()) for p in found]
    if not runs:
        print("no benchmark results yet; re-run to continue", flush=True)
        return 3
    import torch

    label = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    label = "".join(c if c.isalnum() or c in "._-" else "-" for c in label)
    agg = aggregate(runs)
    lines = report(agg, label)
    out = args.results / f"demo-sweep-{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(agg, out.with_suffix(".png"), label)
    lines.append(f"![speedup and tau against image tokens]({out.with_suffix('.png').name})")
    if ablation_json.is_file():
        lines += [""] + ablation_report(json.loads(ablation_json.read_text()), folders)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    done = all(len(runs.get(n, [])) == len(args.seeds if n == biggest else args.other_seeds) for n in args.tokens)
    done = done and (not args.ablations or ablation_json.is_file())
    return 0 if done else 3


if __name__ == "__main__":
    raise SystemExit(main())
