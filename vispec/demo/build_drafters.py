"""Builds the demo VLM's three drafters with the project's own pipeline and ships them in the package.

    python -m vispec.demo.build_drafters --work /tmp/demo-drafters

1. Renders ``--samples`` scenes (seeds from ``DRAFT_DATA_SEED``: seen neither by the vision
   training nor by the benchmark), pairs each with one of ``PROMPTS``, writes them as a
   LLaVA-style ``samples.json`` + PNGs.
2. ``vispec.data.generate_shards`` (what ``vispec data generate --model demo --suffix ''`` runs):
   the demo VLM answers greedily; shards keep its hidden states. The long-answer suffix is
   part of two of the six prompts rather than appended to all, so that the data covers
   the prompts the demo and the benchmark use.
3. ``vispec.train.train`` (what ``vispec train`` runs) trains ViSpec, EAGLE-2 and HiViS drafters
   on the same shards with the same settings, each scoring the ``--draft-vocab`` most frequent
   answer tokens, and tracks held-out tau after every epoch.
4. Saves each final drafter in bf16 under ``vispec/demo/weights/<kind>/``.

Every step resumes: shards and training checkpoints already in ``--work`` are kept.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from . import DEMO_TREE, DRAFT_DATA_SEED, DRAFTER_KINDS, DRAFTERS_DIR, EVAL_SEED, PROMPTS, build_demo_vlm, prompt
from .scenes import make_scene


def write_samples(folder: Path, n: int, seed0: int) -> Path:
    """n scenes as PNGs + a LLaVA-style samples.json (prompt i cycles through PROMPTS)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"scene-{seed0 + i}.png"
        if not (images / name).is_file():
            make_scene(random.Random(seed0 + i)).image.save(images / name)
        records.append({"id": f"scene-{seed0 + i}", "image": name,
                        "conversations": [{"from": "human", "value": "<image>\n" + PROMPTS[i % len(PROMPTS)]},
                                          {"from": "gpt", "value": ""}]})
    path = folder / "samples.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def main(argv=None):
    from ..data import LONG_ANSWER_SUFFIX, ShardDataset, generate_shards, load_samples
    from ..drafters import DRAFTERS, TreeConfig
    from ..train import TrainConfig, answer_vocab, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (images, shards, checkpoints)")
    ap.add_argument("--samples", type=int, default=320)
    ap.add_argument("--suffix", default="", help=f"appended to every prompt (ViSpec's is {LONG_ANSWER_SUFFIX!r})")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--kinds", nargs="+", choices=DRAFTER_KINDS, default=list(DRAFTER_KINDS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--intermediate-size", type=int, default=768, help="drafter MLP width (the LM's is 1536)")
    ap.add_argument("--draft-vocab", type=int, default=1024)
    ap.add_argument("--num-q", type=int, default=2, help="ViSpec queries per image: num_q - 1 compressed tokens + 1 global feature")
    ap.add_argument("--eval-samples", type=int, default=6)
    ap.add_argument("--out", type=Path, default=DRAFTERS_DIR)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.samples < 1 or args.epochs < 1 or args.draft_vocab < 0 or args.num_q < 1:
        ap.error("--samples, --epochs and --num-q must be >= 1, --draft-vocab >= 0")

    model, processor = build_demo_vlm()
    samples_file = write_samples(args.work / "data", args.samples, DRAFT_DATA_SEED)
    shards = args.work / "shards"
    counts = generate_shards(model, processor, load_samples(samples_file), shards, images_root=args.work / "data" / "images",
                             suffix=args.suffix, max_new_tokens=args.max_new_tokens, batch_size=8)
    print(f"data: {counts}", flush=True)
    dataset = ShardDataset(shards)

    held = []
    for i in range(args.eval_samples):  # held-out scenes past the benchmark's
        scene = make_scene(random.Random(EVAL_SEED + 500 + i))
        text = prompt(processor, f"{PROMPTS[i % len(PROMPTS)]} {args.suffix}".strip())
        held.append(dict(processor(text=[text], images=[scene.image], return_tensors="pt")))
    tree = TreeConfig(*DEMO_TREE)
    vocab = answer_vocab(dataset, model, args.draft_vocab) if args.draft_vocab else None
    print(f"{len(dataset)} samples; draft vocabulary: {len(vocab) if vocab else 'the whole vocabulary'}", flush=True)
    summary = {}
    for kind in args.kinds:
        extra = {"num_q": args.num_q} if kind == "vispec" else {}
        drafter = DRAFTERS[kind].from_target(model, seed=args.seed, intermediate_size=args.intermediate_size, **extra)
        if vocab is not None:
            drafter.set_draft_vocab(vocab)
        cfg = TrainConfig(stage=1, epochs=args.epochs, lr=args.lr, warmup_steps=50, passes=2, seed=args.seed,
                          log_every=20)
        res = train(model, drafter, dataset, cfg, args.work / f"train-{kind}", eval_inputs=held, eval_tokens=96,
                    tree=tree)
        drafter.save_pretrained(args.out / kind, dtype=torch.bfloat16)
        summary[kind] = res["tau_history"]
        print(f"{kind}: held-out tau per epoch {res['tau_history']}; saved to {args.out / kind}", flush=True)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
