"""EAGLE vs ViSpec vs HiViS drafters trained on the same data for the same target.

    vispec bench drafters          # tiny offline LLaVA (vispec.testing), CPU, ~1 minute

Runs the project's own pipeline end to end: `vispec.data.generate_shards` answers
random-image prompts with the target (greedy, long-answer suffix), then
`vispec.train.train` trains each drafter kind with identical settings; held-out tau
(accepted draft tokens per target forward, bonus excluded) is measured with the real
engine before training and after every epoch, and every held-out output is checked
identical to model.generate. Writes <results>/drafters-tiny-<device>.md and
a PNG of tau per epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vispec
from vispec.data import ShardDataset, build_prompt, generate_shards, load_samples
from vispec.drafters import DRAFTERS, TreeConfig
from vispec.testing import tiny_llava_and_processor
from vispec.train import TrainConfig, evaluate_tau, train

from vispec.bench import results_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-samples", type=int, default=24)
    ap.add_argument("--held-out", type=int, default=6)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tree", type=int, nargs=3, default=[6, 3, 2], metavar=("TOTAL", "DEPTH", "TOPK"))
    args = ap.parse_args(argv)
    tree = TreeConfig(*args.tree)
    model, proc = tiny_llava_and_processor()
    work = Path(tempfile.mkdtemp(prefix="vispec-drafters-"))
    rng = np.random.default_rng(0)
    (work / "img").mkdir()
    recs = []
    n = args.train_samples + args.held_out
    for i in range(n):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(work / "img" / f"{i}.png")
        recs.append({"id": f"s{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": f"t{30 + i % 90} t{60 + (7 * i) % 90}"}]})
    (work / "data.json").write_text(json.dumps(recs))
    samples = load_samples(work / "data.json")
    generate_shards(model, proc, samples[: args.train_samples], work / "shards", work / "img", suffix="t2",
                    max_new_tokens=args.answer_tokens, batch_size=8)
    data = ShardDataset(work / "shards")
    held = []
    for s in samples[args.train_samples :]:
        inp = proc(text=[build_prompt(proc, s, "t2", True)], images=[Image.open(work / "img" / s.image).convert("RGB")],
                   return_tensors="pt")
        inp.pop("token_type_ids", None)
        held.append(dict(inp))
    refs = [model.generate(**h, max_new_tokens=args.answer_tokens, do_sample=False) for h in held]

    results = {}
    for kind in ("eagle", "vispec", "hivis"):
        drafter = DRAFTERS[kind].from_target(model, seed=0)
        before = evaluate_tau(model, drafter, held, args.answer_tokens, tree)
        cfg = TrainConfig(stage=1, epochs=args.epochs, lr=args.lr, warmup_steps=10, passes=2, log_every=50)
        res = train(model, drafter, data, cfg, work / f"run-{kind}", eval_inputs=held, eval_tokens=args.answer_tokens, tree=tree)
        same = all(torch.equal(vispec.generate(model, drafter, **h, max_new_tokens=args.answer_tokens, tree=tree).sequences, r)
                   for h, r in zip(held, refs))
        results[kind] = dict(before=before, history=res["tau_history"], same=same)
        print(f"{kind}: tau {before:.2f} -> {res['tau_history'][-1][1]:.2f}, identical outputs: {same}", flush=True)

    label = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    out = results_dir() / f"drafters-tiny-{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Drafters trained on the same data for the same target ({label})",
        "",
        f"Target: the tiny random-weight LLaVA of `vispec.testing` (2 layers, hidden 64). Data: its greedy "
        f"{args.answer_tokens}-token answers to {args.train_samples} random-image prompts (`vispec data generate` "
        f"path); {args.held_out} held-out prompts. Training: stage 1 losses, 2 passes (self-correction), "
        f"lr {args.lr}, {args.epochs} epochs, identical for the three kinds. Tree {tuple(args.tree)} "
        f"(tau at most {tree.depth}). tau = accepted draft tokens per target forward, bonus excluded.",
        "",
        "| drafter | tau untrained | tau trained | best epoch tau | held-out outputs identical to generate |",
        "|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        taus = [t for _, t in r["history"]]
        lines.append(f"| {kind} | {r['before']:.2f} | {taus[-1]:.2f} | {max(taus):.2f} | {'yes' if r['same'] else 'NO'} |")
    png = out.with_suffix(".png")
    _plot(results, png)
    lines += ["", f"![tau per epoch]({png.name})", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {png}")
    if not all(r["same"] for r in results.values()):
        sys.exit("a trained drafter changed the output")


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, r in results.items():
        xs = [0] + [e for e, _ in r["history"]]
        ys = [r["before"]] + [t for _, t in r["history"]]
        ax.plot(xs, ys, "o-", label=kind)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out tau")
    ax.set_title("drafters on the tiny LLaVA, same data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
