"""The image-token sweep: the same recipe at several image-token counts, so that tau and speedup can be
plotted against the number of image tokens per drafter kind (the ViSpec paper's Section 4.1 argument,
measured).

    python -m vispec.demo.sweep --work /tmp/sweep                      # 36, 144, 576 tokens; many hours on a CPU
    python -m vispec.demo.sweep --work /tmp/sweep --max-minutes 150    # one session's chunk; re-run to continue

A session's disk does not outlive it, so what later chunks need is kept small and in ``--state``
(``benchmarks/sweep/<N>/`` in the repository, committed after each chunk): the answers the data is
rebuilt from, every benchmark's journal and result, every training's summary. Everything else
(shards, checkpoints, drafters other than the shipped ones) lives in ``--work`` and is rebuilt.

For each image-token count N, in order, each step skipped when its output exists (so the command resumes):

1. vision weights: the package's for N (``vispec/demo/weights/vision[-N].safetensors``) when their
   metadata marks them complete, else ``python -m vispec.demo.train_vision --image-tokens N --resume``
   trains (or finishes) them there, checkpointed;
2. per (seed, head generation) unit (``--seeds`` x ``--generations`` at the largest N, ``--other-seeds``
   and EAGLE-2 heads at the others): the three drafter kinds trained by ``python -m
   vispec.demo.build_drafters`` with identical settings (the data from ``--state``'s answers logs), then
   benchmarked at once by ``vispec bench e2e --suite demo`` with a journal in ``--state``
   (``bench-seed<s>-gen<g>``), so that a unit stopped by the session's end resumes. The largest N's seed-0
   drafters are trained into the package (``vispec/demo/weights/drafters-<N>/``), where they ship; the
   others into ``--work``. A training starts only with ``--train-minutes`` left (it would not finish,
   and its checkpoints do not outlive the session);
3. ablations at the largest N, right after its first unit (seed 0, the same data and settings, one part
   changed each, see ``ABLATIONS``): each trained by build_drafters ``--variant`` and benchmarked on the
   same prompts as the seed-0 drafters (``bench-ablation-<name>``);
4. the table and plot: ``benchmarks/results/demo-sweep-<device>.md`` / ``.png``, mean and min-max
   over seeds of tau and speedup per kind and temperature, and the ablation table.

Steps run as subprocesses (each resumable on its own); ``--max-minutes`` stops before a step, and
inside a benchmark before a unit, once that much time has passed (exit 3: re-run to continue).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import DRAFTER_KINDS, drafter_dir_name, drafter_label, drafter_names, drafters_dir
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


def ablation_report(reference: dict, ablations: dict[str, dict]) -> list[str]:
    """Each ablation's benchmark under the seed-0 drafter of its kind (same prompts and settings), per temperature.
    Every benchmark is its own run, so the speedups carry that run's machine; its prompt-lookup speedup (no
    drafter, nothing trained) says how far the machine drifted between runs."""
    lines = ["## Ablations (largest image-token count, seed 0, the same prompts)", "",
             "Each row is a benchmark of its own (speedup over model.generate in that run); tau compares across runs, "
             "the speedups carry each run's machine, as its prompt-lookup speedup (last column) shows.", "",
             "| temperature | drafter | trained as | tau | speedup | prompt lookup, same run |", "|---|---|---|---|---|---|"]
    runs = [("seed 0", reference)] + [(ABLATIONS[a][0], r) for a, r in ablations.items()]
    for temp, methods in reference["results"].items():
        ablated = {k for r in ablations.values() for k in r["results"].get(temp, {})} - {"plain", "lookup"}
        for kind in (k for k in methods if k in ablated):
            for name, res in runs:
                row = res["results"].get(temp, {})
                if kind not in row:
                    continue
                a, look = row[kind], row.get("lookup")
                tau = "-" if a["tau"] is None else f"{a['tau']:.2f}"
                lines.append(f"| {temp} | {method_label(kind)} | {name} | {tau} | {a['speedup']:.2f}x | "
                             + ("-" if look is None else f"{look['speedup']:.2f}x") + " |")
    return lines + [""]


def generation_report(agg: dict, tokens: int) -> list[str]:
    """Each kind's EAGLE-2 head against its EAGLE-3 head at ``tokens`` image tokens (same data and budget), per
    temperature: tau as mean (min-max, n) over seeds, and whether the difference is larger than that spread (the
    ranges do not overlap, with at least two seeds each) or not."""
    def cell(v):
        return "-" if v is None else f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f}, {v[3]})"

    rows = []
    for temp, methods in agg.items():
        for kind in DRAFTER_KINDS:
            two, three = (methods.get(drafter_dir_name(kind, g), {}).get(tokens, {}).get("tau") for g in (2, 3))
            if two is None or three is None:
                continue
            if min(two[3], three[3]) < 2:
                verdict = "fewer than 2 seeds of one: no spread yet"
            elif three[1] > two[2] or two[1] > three[2]:
                verdict = f"EAGLE-{3 if three[0] > two[0] else 2} head ahead, beyond the seed spread"
            else:
                verdict = "within the seed spread"
            rows.append(f"| {temp} | {drafter_label(kind)} | {cell(two)} | {cell(three)} | {three[0] - two[0]:+.2f} | "
                        f"{verdict} |")
    if not rows:
        return []
    return [f"## Head generations ({tokens} image tokens, same data and training budget)", "",
            "tau per kind with the EAGLE-2 head (one layer over the last hidden state) and the EAGLE-3 head (three fused "
            "target layers, training-time test): mean (min-max, n seeds).", "",
            "| temperature | kind | EAGLE-2 head | EAGLE-3 head | EAGLE-3 - EAGLE-2 | verdict |",
            "|---|---|---|---|---|---|", *rows, ""]


def report(agg: dict, label: str) -> list[str]:
    lines = [f"# The image-token sweep on {label}", "",
             "Same recipe (vision training, data, drafter training, tree) at each image-token count; tau = accepted "
             "draft tokens per target forward (bonus excluded), speedup over model.generate in the same run. "
             "Cells: mean (min-max, n): over the benchmark runs of that method, one per training seed (EAGLE-2 and "
             "EAGLE-3 heads are methods of their own); prompt lookup trains nothing and is measured in every run, "
             "so its n counts runs and its spread is the machine's.", ""]
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
    ap.add_argument("--work", type=Path, required=True, help="scratch (shards, checkpoints, unshipped drafters)")
    ap.add_argument("--state", type=Path, default=ROOT / "benchmarks" / "sweep",
                    help="what later chunks need, small: answers logs, benchmark journals and results (commit it)")
    ap.add_argument("--tokens", type=int, nargs="+", default=sorted(GEOMETRY), choices=sorted(GEOMETRY))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="drafter seeds at the largest count")
    ap.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="drafter seeds at the other counts")
    ap.add_argument("--build-args", default="",
                    help="extra arguments of build_drafters, the same for every count (none: its defaults, the shipped "
                         "drafters' recipe)")
    ap.add_argument("--generations", type=int, nargs="+", choices=[2, 3], default=[2, 3],
                    help="drafter heads trained at the largest count (the others: EAGLE-2 only)")
    ap.add_argument("--bench-args", default="--images 40", help="extra bench_e2e arguments of every benchmark")
    ap.add_argument("--first-bench-args", default="--batches 1 4 8 --text-only 6 --depth-sweep 8",
                    help="more for each count's seed-0 EAGLE-2 unit (the others: no batches, prefill or depth sweep)")
    ap.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                    help="ablations trained and benchmarked at the largest count (none: skip)")
    ap.add_argument("--max-minutes", type=float, default=0, help="> 0: start no step (or benchmark unit) after this")
    ap.add_argument("--train-minutes", type=float, default=50,
                    help="with --max-minutes: start a training only with this many minutes left")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the results already in --state")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the table and plot go")
    args = ap.parse_args(argv)
    t0 = time.time()

    def left() -> float:
        return args.max_minutes - (time.time() - t0) / 60 if args.max_minutes else float("inf")

    class OutOfTime(Exception):
        pass

    def run(cmd: list[str], train: bool = False) -> None:
        if left() <= 0 or (train and left() < args.train_minutes):
            raise OutOfTime(" ".join(cmd[2:5]))
        if left() != float("inf") and not train:
            cmd = cmd + ["--max-minutes", f"{left():.1f}"]
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc == 3:  # stopped at its time limit, resumable
            raise OutOfTime(" ".join(cmd[2:5]))
        if rc != 0:
            raise SystemExit(f"step failed (exit {rc}): {' '.join(cmd)}")

    py = sys.executable
    biggest = max(args.tokens)

    def bench(n: int, weights: Path, folder: Path, names: list[str], name: str, extra: str) -> None:
        state = args.state / str(n)
        if (state / f"{name}.json").is_file():
            return
        run([py, "-m", "vispec.bench.e2e", "--suite", "demo", "--image-tokens", str(n), "--vision-weights",
             str(weights), "--drafters", str(folder), "--only", *names, "--journal", str(state / f"{name}.jsonl"),
             "--out", str(state / f"{name}.md"), "--json", str(state / f"{name}.json"),
             *args.bench_args.split(), *extra.split()])

    def build(n: int, weights: Path, out: Path, seed: int, gens: list[int], extra: list[str], summary: str) -> None:
        work, state = args.work / str(n), args.state / str(n)
        run([py, "-m", "vispec.demo.build_drafters", "--work", str(work), "--answers", str(state), "--image-tokens",
             str(n), "--vision-weights", str(weights), "--out", str(out), "--seed", str(seed),
             "--generations", *map(str, gens), *(["--eagle3-layers"] if n == biggest and 3 in args.generations else []),
             "--summary", str(state / f"{summary}.json"), *args.build_args.split(), *extra], train=True)

    quiet = "--depth-sweep 0 --prefill-pairs 0"
    try:
        for n in [] if args.report_only else args.tokens:
            (args.state / str(n)).mkdir(parents=True, exist_ok=True)
            weights = vision_weights_path(n)  # trained (or finished) in the package: the one that ships
            if not (weights.is_file() and weights_metadata(weights).get("complete") == "1"):
                run([py, "-m", "vispec.demo.train_vision", "--image-tokens", str(n), "--resume", "--out",
                     str(weights), "--bf16"])
                if weights_metadata(weights).get("complete") != "1":
                    raise OutOfTime("vision training")
            for seed in args.seeds if n == biggest else args.other_seeds:
                for gen in args.generations if n == biggest else [2]:
                    folder = drafters_dir(n) if n == biggest and seed == 0 else args.work / str(n) / f"drafters-seed{seed}"
                    names = drafter_names([gen])
                    unit = f"seed{seed}-gen{gen}"
                    first = seed == min(args.seeds if n == biggest else args.other_seeds) and gen == 2
                    if not (args.state / str(n) / f"bench-{unit}.json").is_file():
                        if not all((folder / k / "config.json").is_file() for k in names):
                            build(n, weights, folder, seed, [gen], [], f"train-{unit}")
                        bench(n, weights, folder, names, f"bench-{unit}", args.first_bench_args if first else quiet)
                    if n == biggest and first:
                        for a in args.ablations:  # about this model and these drafters: right after them
                            out = args.work / str(n) / f"ablation-{a}"
                            kinds = ABLATIONS[a][1][ABLATIONS[a][1].index("--kinds") + 1 :][:1]
                            if (args.state / str(n) / f"bench-ablation-{a}.json").is_file():
                                continue
                            if not all((out / k / "config.json").is_file() for k in kinds):
                                build(n, weights, out, seed, [2], ["--variant", a, *ABLATIONS[a][1]], f"train-ablation-{a}")
                            bench(n, weights, out, kinds, f"bench-ablation-{a}", quiet)
        stopped = False
    except OutOfTime as e:
        print(f"out of time before {e}: re-run to continue (commit {args.state} first)", flush=True)
        stopped = True
    runs = {}
    for n in args.tokens:
        found = sorted((args.state / str(n)).glob("bench-seed*-gen*.json"))
        if found:
            runs[n] = [json.loads(p.read_text()) for p in found]
    if not runs:
        print("no benchmark results yet; re-run to continue", flush=True)
        return 3
    from ..bench import device_label

    label = device_label()
    agg = aggregate(runs)
    lines = report(agg, label)
    out = args.results / f"demo-sweep-{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(agg, out.with_suffix(".png"), label)
    lines.append(f"![speedup and tau against image tokens]({out.with_suffix('.png').name})")
    state = args.state / str(biggest)
    reference = state / "bench-seed0-gen2.json"
    ablations = {a: json.loads((state / f"bench-ablation-{a}.json").read_text()) for a in args.ablations
                 if (state / f"bench-ablation-{a}.json").is_file()}
    generations = generation_report(agg, biggest)
    if generations:
        lines += [""] + generations
    if reference.is_file() and ablations:
        lines += [""] + ablation_report(json.loads(reference.read_text()), ablations)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    want = {n: len(args.seeds) * len(args.generations) if n == biggest else len(args.other_seeds) for n in args.tokens}
    done = not stopped and all(len(runs.get(n, [])) == k for n, k in want.items()) and len(ablations) == len(args.ablations)
    return 0 if done else 3


if __name__ == "__main__":
    raise SystemExit(main())
