"""The ``vispec`` command line.

    vispec data generate --model PATH --data samples.jsonl --images-root DIR --out DIR [...]
    vispec train --model PATH --data SHARDS --drafter vispec --out DIR [--stage 2 --init STAGE1/final] [...]
"""
from __future__ import annotations

import argparse
import logging
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_target(path: str, dtype: str = "auto", device: str | None = None):
    """(model, processor) of a Hugging Face checkpoint directory: a VLM with its processor, or a causal LM
    with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    kw = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        processor = AutoTokenizer.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def _data_generate(args) -> int:
    from .data import generate_shards, load_samples

    samples = load_samples(args.data)
    if args.limit:
        samples = samples[: args.limit]
    model, processor = load_target(args.model, args.dtype, args.device)
    counts = generate_shards(
        model, processor, samples, args.out, images_root=args.images_root, suffix=args.suffix,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
        temperature=args.temperature,
    )
    print(f"{counts['written']} samples written, {counts['skipped']} skipped (see {args.out}/skipped.jsonl), "
          f"{counts['already_done']} already done")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from .data import ShardDataset, build_prompt, load_samples
    from .drafters import DRAFTERS, TreeConfig, load_drafter
    from .train import TrainConfig, train

    dataset = ShardDataset(args.data)  # fails before loading the model if there is no data
    model, processor = load_target(args.model, args.dtype, args.device)
    if args.init:
        drafter = load_drafter(args.init, model)
        if drafter.drafter_type() != args.drafter:
            # Stage 2 from a stage-1 EAGLE head: same fc / layer weights, new adaptor (img_fc starts as identity).
            fresh = DRAFTERS[args.drafter].from_target(model, seed=args.seed, num_q=args.num_q)
            missing = fresh.load_state_dict(drafter.state_dict(), strict=False)
            print(f"initialised {args.drafter} from {args.init}; new parameters: {missing.missing_keys}")
            drafter = fresh
    else:
        drafter = DRAFTERS[args.drafter].from_target(model, seed=args.seed, num_q=args.num_q)
    eval_inputs = []
    if args.eval_data:
        from PIL import Image

        for s in load_samples(args.eval_data)[: args.eval_samples]:
            kw = {}
            if s.image is not None:
                root = Path(args.images_root) if args.images_root else Path()
                kw["images"] = [Image.open(root / s.image).convert("RGB")]
            inp = processor(text=[build_prompt(processor, s, args.suffix, bool(kw))], return_tensors="pt", **kw)
            inp.pop("token_type_ids", None)
            eval_inputs.append({k: v.to(model.device) for k, v in inp.items()})
    cfg = TrainConfig(stage=args.stage, epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps,
                      batch_size=args.batch_size, grad_clip=args.grad_clip, passes=args.passes, noise=not args.no_noise,
                      seed=args.seed, mixed_precision=args.mixed_precision)
    res = train(model, drafter, dataset, cfg, args.out, eval_inputs=eval_inputs, eval_tokens=args.eval_tokens,
                tree=TreeConfig(*args.tree), resume=not args.no_resume)
    taus = ", ".join(f"epoch {e}: {t:.2f}" for e, t in res["tau_history"]) or "no held-out evaluation"
    print(f"{res['steps']} steps, last loss {res['last_loss']}; held-out tau {taus}; drafter in {args.out}/final")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import LONG_ANSWER_SUFFIX

    ap = argparse.ArgumentParser(prog="vispec", description="vision-aware speculative decoding")
    sub = ap.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="drafter training data").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("generate", help="answer samples with the target and store shards for training (resumable)")
    g.add_argument("--model", required=True, help="target checkpoint directory")
    g.add_argument("--data", required=True, help="LLaVA-style JSON/JSONL (image + conversations) or ShareGPT-style text")
    g.add_argument("--images-root", default=None, help="directory the samples' image paths are relative to")
    g.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    g.add_argument("--suffix", default=LONG_ANSWER_SUFFIX, help="appended to every instruction ('' for none)")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--shard-size", type=int, default=64, help="samples per shard file")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--limit", type=int, default=None, help="only the first N samples")
    g.add_argument("--dtype", choices=DTYPES, default="auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=_data_generate)

    t = sub.add_parser("train", help="train a drafter on shards from `vispec data generate` (resumable)")
    t.add_argument("--model", required=True, help="target checkpoint directory")
    t.add_argument("--data", required=True, help="shard directory written by `vispec data generate`")
    t.add_argument("--drafter", choices=["vispec", "hivis", "eagle"], default="vispec")
    t.add_argument("--out", required=True, help="checkpoints (checkpoint-*/) and the final drafter (final/)")
    t.add_argument("--init", default=None, help="start from this drafter (stage 2 from a stage-1 EAGLE head)")
    t.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: text losses, 2: ViSpec probability loss")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: one epoch")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--passes", type=int, default=2, help="1 + number of self-correction passes")
    t.add_argument("--no-noise", action="store_true", help="no EAGLE feature noise")
    t.add_argument("--num-q", type=int, default=2, help="ViSpec queries per image")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto")
    t.add_argument("--eval-data", default=None, help="held-out samples (JSON/JSONL) for tau after each epoch")
    t.add_argument("--images-root", default=None)
    t.add_argument("--suffix", default=LONG_ANSWER_SUFFIX)
    t.add_argument("--eval-samples", type=int, default=8)
    t.add_argument("--eval-tokens", type=int, default=64)
    t.add_argument("--tree", type=int, nargs=3, default=[30, 3, 8], metavar=("TOTAL", "DEPTH", "TOPK"))
    t.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out")
    t.add_argument("--dtype", choices=DTYPES, default="auto")
    t.add_argument("--device", default=None)
    t.set_defaults(func=_train)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "shard_size", "epochs", "passes", "eval_tokens"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"vispec: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
