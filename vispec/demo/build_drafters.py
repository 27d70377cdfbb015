"""Builds the demo VLM's three drafters with the project's own pipeline and ships them in the package.

    python -m vispec.demo.build_drafters --work /tmp/demo-drafters

1. Renders ``--samples`` scenes (seeds from ``DRAFT_DATA_SEED``: seen neither by the vision
   training nor by the benchmark), pairs each with one of ``PROMPTS``, writes them as a
   LLaVA-style ``samples.json`` + PNGs.
2. ``vispec.data.generate_shards`` (what ``vispec data generate --model demo --suffix ''`` runs):
   the demo VLM answers greedily, and a second set of scenes (``--sampled``) at temperature 1,
   so that the drafters also learn what sampled answers say; shards keep its hidden states.
   The answers' token ids are logged in ``--answers``/answers-<set>.jsonl (a few kB per sample):
   with that folder kept (the sweep commits it), shards are rebuilt from it by one forward per
   sample instead of a generation, the same answers, sampled ones included.
   The long-answer suffix is part of two of the six prompts rather than appended to all, so
   that the data covers the prompts the demo and the benchmark use.
3. The draft vocabulary: the fewest tokens that cover ``--draft-vocab-coverage`` of the sampled
   answers' tokens (or, with 0 there, the ``--draft-vocab`` most frequent answer tokens); the
   coverage of both answer sets is reported.
4. ``vispec.train.train`` (what ``vispec train`` runs) trains ViSpec, EAGLE-2 and HiViS drafters
   on the same shards with the same settings: ``--epochs`` of stage 1 (feature + soft CE), then
   ``--stage2-epochs`` of ViSpec's stage-2 objective (10 x probability L1 + 0.1 x ListMLE) at
   ``--stage2-lr``, a tenth of stage 1's (at stage 1's rate, re-warmed, stage 2 lowered held-out
   tau on the 36-token model: 3.83 -> 3.38 for ViSpec), and tracks held-out tau after every epoch.
5. Saves each final drafter in bf16 under ``--out/<kind>/`` (EAGLE-3 heads: ``--out/<kind>-eagle3/``).

The defaults (``--help``) are the recipe of the shipped 576-token drafters and of every point of the
sweep (``vispec.demo.sweep``).

Ablations (``--variant NAME`` keeps their checkpoints apart): ``--no-global-feature`` and ``--num-q`` for
ViSpec, ``--hivis-residuals K``, ``--stage2 hivis`` and ``--select-topk`` for HiViS's parts.

``--generations 2 3`` trains every kind on both heads (EAGLE-2 and EAGLE-3: the shards then also hold the
target's layer states EAGLE-3 reads) with the same data, epochs and learning rate; EAGLE-3 heads train
with the training-time test (``--ttt-steps``) instead of the self-correction pass.

``--image-tokens`` chooses the demo VLM (36, 144 or 576 image tokens per image, default 576; its vision
weights from the package, or ``--vision-weights``; the drafters go beside the package's for that count
unless ``--out`` says otherwise).

Every step resumes: shards and training checkpoints already in ``--work`` are kept. The data is
shared by every ``--seed``; each seed trains under ``--work/seed-<seed>/``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from . import (DEMO_TREE, DRAFT_DATA_SEED, DRAFTER_KINDS, EVAL_SEED, PROMPTS, build_demo_vlm,
               drafter_dir_name, drafters_dir, prompt)
from .model import DEFAULT_IMAGE_TOKENS, GEOMETRY, scene_size, vision_weights_path
from .scenes import make_scene

SAMPLED_DATA_SEED = DRAFT_DATA_SEED + 10**6  # scenes of the temperature-1 answers, apart from the greedy ones


def coverage(dataset, vocab) -> float:
    """Fraction of the answer tokens of ``dataset`` that ``vocab`` holds."""
    keep = set(int(t) for t in vocab)
    hit = total = 0
    for r in dataset:
        ans = r["input_ids"][r["loss_mask"].bool()].tolist()
        hit += sum(t in keep for t in ans)
        total += len(ans)
    return hit / max(total, 1)


def vocab_for_coverage(dataset, model, target: float) -> list[int]:
    """The fewest most-frequent answer tokens (EOS included) covering ``target`` of the answers' tokens."""
    from collections import Counter

    from ..seq import eos_list

    counts = Counter()
    for r in dataset:
        counts.update(r["input_ids"][r["loss_mask"].bool()].tolist())
    total = sum(counts.values())
    keep, hit = list(dict.fromkeys(eos_list(model.generation_config.eos_token_id))), 0
    hit = sum(counts.get(t, 0) for t in keep)
    for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if hit >= target * total:
            break
        if t not in keep:
            keep.append(t)
            hit += c
    return sorted(keep)


def write_samples(folder: Path, n: int, seed0: int, size: int) -> Path:
    """n scenes drawn at ``size`` pixels as PNGs + a LLaVA-style samples.json (prompt i cycles through PROMPTS)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"scene-{seed0 + i}-{size}px.png"
        if not (images / name).is_file():
            make_scene(random.Random(seed0 + i), size=size).image.save(images / name)
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
    ap.add_argument("--samples", type=int, default=320, help="scenes answered greedily")
    ap.add_argument("--sampled", type=int, default=160, help="more scenes, answered at temperature 1")
    ap.add_argument("--image-tokens", type=int, choices=sorted(GEOMETRY), default=DEFAULT_IMAGE_TOKENS)
    ap.add_argument("--vision-weights", type=Path, default=None, help="default: the package's for --image-tokens")
    ap.add_argument("--suffix", default="", help=f"appended to every prompt (ViSpec's is {LONG_ANSWER_SUFFIX!r})")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--kinds", nargs="+", choices=DRAFTER_KINDS, default=list(DRAFTER_KINDS))
    ap.add_argument("--generations", type=int, nargs="+", choices=[2, 3], default=[2],
                    help="drafter heads: 2 = EAGLE-2, 3 = EAGLE-3 (each kind on each)")
    ap.add_argument("--eagle3-layers", action="store_true",
                    help="store the target layer states EAGLE-3 heads read even without --generations 3 (so that "
                         "EAGLE-2 and EAGLE-3 runs share one set of shards)")
    ap.add_argument("--ttt-steps", type=int, default=None, help="EAGLE-3 heads' training-time test (default 7)")
    ap.add_argument("--epochs", type=int, default=20, help="stage 1 epochs")
    ap.add_argument("--stage2-epochs", type=int, default=4, help="then ViSpec's stage-2 objective for this many")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lr", type=float, default=1e-4, help="stage 2's learning rate")
    ap.add_argument("--answers", type=Path, default=None,
                    help="folder of the answers logs (default --work): keep it to rebuild the shards without generating")
    ap.add_argument("--intermediate-size", type=int, default=768, help="drafter MLP width (the LM's is 1536)")
    ap.add_argument("--draft-vocab", type=int, default=1024)
    ap.add_argument("--draft-vocab-coverage", type=float, default=0.99,
                    help="the fewest tokens covering this fraction of the (sampled) answers' tokens (0: --draft-vocab's "
                         "most frequent instead)")
    ap.add_argument("--num-q", type=int, default=2, help="ViSpec queries per image: num_q - 1 compressed tokens + 1 global feature")
    ap.add_argument("--eval-samples", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out tau after every N-th epoch (0: after each stage's last only)")
    ap.add_argument("--out", type=Path, default=None, help="default: the package's drafters for --image-tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--summary", type=Path, default=None,
                    help="JSON of the data and each drafter's held-out tau, updated as each drafter is saved (default "
                         "--work/seed-<seed>/summary.json); a drafter already saved in --out and summarised there is "
                         "not trained again")
    # Ablations (same data; train under --work/seed-<seed>-<variant>/ so the main run's checkpoints stay apart).
    ap.add_argument("--variant", default="", help="name of an ablation run (its own training folder)")
    ap.add_argument("--no-global-feature", action="store_true", help="ViSpec without the global image feature")
    ap.add_argument("--hivis-residuals", type=int, default=0,
                    help="HiViS: step-dependent residual vectors (0: the plain text-only drafter)")
    ap.add_argument("--stage2", choices=["vispec", "hivis"], default="vispec",
                    help="second-stage objective: ViSpec's (10 x L1 + 0.1 x ListMLE) or HiViS's (multi-step "
                         "self-feedback with dynamic data selection)")
    ap.add_argument("--select-topk", type=int, default=None, help="--stage2 hivis: data selection top-k (0: off)")
    args = ap.parse_args(argv)
    if args.hivis_residuals < 0 or (args.select_topk is not None and args.select_topk < 0):
        ap.error("--hivis-residuals and --select-topk must be >= 0")
    if args.samples < 1 or args.epochs < 1 or args.draft_vocab < 0 or args.num_q < 1 or args.sampled < 0 \
            or args.stage2_epochs < 0:
        ap.error("--samples, --epochs and --num-q must be >= 1, --draft-vocab, --sampled and --stage2-epochs >= 0")
    if args.lr <= 0 or args.stage2_lr <= 0:
        ap.error("--lr and --stage2-lr must be > 0")
    if not 0 <= args.draft_vocab_coverage <= 1:
        ap.error("--draft-vocab-coverage must be in [0, 1] (0: --draft-vocab)")
    weights = args.vision_weights or vision_weights_path(args.image_tokens)
    args.out = args.out or drafters_dir(args.image_tokens)
    if not weights.is_file():
        ap.error(f"{weights} must be a vision weights file (there is none): train it with "
                 f"`python -m vispec.demo.train_vision --image-tokens {args.image_tokens} --out {weights}`")

    model, processor = build_demo_vlm(weights, image_tokens=args.image_tokens)
    from ..drafters.eagle import eagle3_layers

    layers = eagle3_layers(model.config.get_text_config().num_hidden_layers) \
        if 3 in args.generations or args.eagle3_layers else None
    sets = {}
    for name, n, seed0, temperature in (("greedy", args.samples, DRAFT_DATA_SEED, 0.0),
                                        ("sampled", args.sampled, SAMPLED_DATA_SEED, 1.0)):
        if n == 0:
            continue
        folder = args.work / f"data-{name}"
        samples_file = write_samples(folder, n, seed0, scene_size(model))
        torch.manual_seed(args.seed)  # sampled answers: reproducible
        counts = generate_shards(model, processor, load_samples(samples_file), args.work / f"shards-{name}",
                                 images_root=folder / "images", suffix=args.suffix, max_new_tokens=args.max_new_tokens,
                                 batch_size=8, temperature=temperature, feature_layers=layers,
                                 answers_file=(args.answers or args.work) / f"answers-{name}.jsonl")
        print(f"data ({name}): {counts}", flush=True)
        sets[name] = ShardDataset(args.work / f"shards-{name}")
    dataset = torch.utils.data.ConcatDataset(list(sets.values()))

    held = []
    for i in range(args.eval_samples):  # held-out scenes past the benchmark's
        scene = make_scene(random.Random(EVAL_SEED + 500 + i), size=scene_size(model))
        text = prompt(processor, f"{PROMPTS[i % len(PROMPTS)]} {args.suffix}".strip())
        held.append(dict(processor(text=[text], images=[scene.image], return_tensors="pt")))
    tree = TreeConfig(*DEMO_TREE)
    if args.draft_vocab_coverage:
        vocab = vocab_for_coverage(sets.get("sampled", dataset), model, args.draft_vocab_coverage)
    else:
        vocab = answer_vocab(dataset, model, args.draft_vocab) if args.draft_vocab else None
    cover = {name: coverage(ds, vocab) for name, ds in sets.items()} if vocab else {}
    print(f"{len(dataset)} samples; draft vocabulary: {len(vocab) if vocab else 'the whole vocabulary'}; "
          f"answer-token coverage {cover}", flush=True)
    # The data above is shared by every seed's (and ablation's) training.
    run_dir = args.work / (f"seed-{args.seed}" + (f"-{args.variant}" if args.variant else ""))
    summary_file = args.summary or run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary.update({"draft_vocab": len(vocab) if vocab else None, "coverage": cover})
    for gen in args.generations:
        for kind in args.kinds:
            name = drafter_dir_name(kind, gen)
            if name in summary and (args.out / name / "config.json").is_file():
                print(f"{name}: already trained and saved in {args.out / name}", flush=True)
                continue
            extra = {"num_q": args.num_q, "global_feature": not args.no_global_feature} if kind == "vispec" else {}
            if kind == "hivis" and args.hivis_residuals:
                extra["hivis_residuals"] = args.hivis_residuals
            if gen == 3:
                extra.update(generation=3, feature_layers=layers)
            drafter = DRAFTERS[kind].from_target(model, seed=args.seed, intermediate_size=args.intermediate_size, **extra)
            if vocab is not None:
                drafter.set_draft_vocab(vocab)
            history = []
            for stage, epochs in ((1, args.epochs), (2 if args.stage2 == "vispec" else "hivis", args.stage2_epochs)):
                if epochs == 0:
                    continue
                lr = args.lr if stage == 1 else args.stage2_lr
                cfg = TrainConfig(stage=stage, epochs=epochs, lr=lr, warmup_steps=50, seed=args.seed, log_every=20,
                                  ttt_steps=args.ttt_steps if gen == 3 and stage != "hivis" else None,
                                  select_topk=args.select_topk if stage == "hivis" else None)
                res = train(model, drafter, dataset, cfg, run_dir / f"train-{name}" / f"stage{stage}", eval_inputs=held,
                            eval_tokens=96, tree=tree, eval_every=args.eval_every or epochs)
                history += [[stage, e, t] for e, t in res["tau_history"]]
            drafter.save_pretrained(args.out / name, dtype=torch.bfloat16)
            summary[name] = history
            summary_file.parent.mkdir(parents=True, exist_ok=True)
            summary_file.write_text(json.dumps(summary, indent=1))
            print(f"{name}: held-out tau per (stage, epoch) {history}; saved to {args.out / name}", flush=True)


if __name__ == "__main__":
    main()
