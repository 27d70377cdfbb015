"""The ``vispec`` command line.

    vispec data generate --model PATH --data samples.jsonl --images-root DIR --out DIR [...]
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
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "shard_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"vispec: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
