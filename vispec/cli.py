"""The ``vispec`` command line.

    vispec demo [--image PNG] [--prompt TEXT] [--drafter vispec|eagle|hivis] [--temperature T]
    vispec generate --model DIR --drafter DIR [--image PATH ...] --prompt TEXT [--compare] [...]
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
    with its tokenizer. ``demo`` is the bundled offline demo VLM (``vispec.demo``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if path == "demo":
        from .demo.model import build_demo_vlm

        model, processor = build_demo_vlm(dtype=torch.float32 if dtype == "auto" else getattr(torch, dtype))
        return model.to(device).eval(), processor
    kw = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    cfg = AutoConfig.from_pretrained(path)
    if hasattr(cfg, "vision_config"):
        model = AutoModelForImageTextToText.from_pretrained(path, **kw)
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        processor = AutoTokenizer.from_pretrained(path)
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
        temperature=args.temperature, feature_layers=_feature_layers(args.feature_layers, model),
        answers_file=args.answers,
    )
    print(f"{counts['written']} samples written ({counts['replayed']} from logged answers), {counts['skipped']} "
          f"skipped (see {args.out}/skipped.jsonl), {counts['already_done']} already done")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from .data import ShardDataset, build_prompt, load_samples
    from .drafters import DRAFTERS, TreeConfig, load_drafter
    from .train import TrainConfig, answer_vocab, train

    if args.online:  # --data is a samples file; the frozen target computes every record in the loop
        samples = load_samples(args.data)  # bad input fails before the model loads
        dataset = None
    else:
        dataset = ShardDataset(args.data)  # fails before loading the model if there is no data
        if args.generation == 3 and dataset.feature_layers is None:
            return _fail("train", f"{args.data} holds no target layer states (aux_hidden), which an EAGLE-3 head reads: "
                                  "generate it with `vispec data generate --feature-layers eagle3`, or train --online")
    model, processor = load_target(args.model, args.dtype, args.device)
    if args.init:
        drafter = load_drafter(args.init, model)
        resize = args.drafter == "hivis" and args.hivis_residuals and args.hivis_residuals != drafter.config.hivis_residuals
        if drafter.drafter_type() != args.drafter or resize:
            # Stage 2 from a stage-1 head: same base and weights, new parts (ViSpec's img_fc starts as the
            # identity; HiViS's extra residual rows as its last one).
            more = {"hivis_residuals": args.hivis_residuals} if args.drafter == "hivis" and args.hivis_residuals else {}
            drafter = DRAFTERS[args.drafter].from_drafter(drafter, model, seed=args.seed, num_q=args.num_q, **more)
            print(f"initialised {args.drafter} from {args.init}")
    else:
        extra = {}
        if args.generation == 3:  # the layers: given, else those the shards hold, else (online) EAGLE-3's
            layers = _feature_layers(args.feature_layers, model) or (dataset.feature_layers if dataset is not None
                                                                     else _feature_layers("eagle3", model))
            extra = dict(generation=3, feature_layers=layers)
        if args.drafter == "hivis" and args.hivis_residuals:
            extra["hivis_residuals"] = args.hivis_residuals
        drafter = DRAFTERS[args.drafter].from_target(model, seed=args.seed, num_q=args.num_q, **extra)
    if dataset is None:
        import os

        from .data import OnlineDataset

        dataset = OnlineDataset(model, processor, samples, Path(args.out) / "online", images_root=args.images_root,
                                suffix=args.suffix, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                batch_size=args.answer_batch_size, feature_layers=drafter.feature_layers,
                                rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)))
    if args.draft_vocab and not args.init:
        drafter.set_draft_vocab(answer_vocab(dataset, model, args.draft_vocab))
        print(f"draft vocabulary: the {drafter.config.draft_vocab_size} most frequent answer tokens")
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
    if drafter.feature_layers is not None and drafter.feature_layers != dataset.feature_layers:
        return _fail("train", f"the drafter reads the target's layers {drafter.feature_layers}, {args.data} holds "
                              f"{dataset.feature_layers}")
    cfg = TrainConfig(stage=args.stage, epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps,
                      batch_size=args.batch_size, grad_clip=args.grad_clip, passes=args.passes,
                      noise=False if args.no_noise else None, ttt_steps=args.ttt_steps,
                      seed=args.seed, mixed_precision=args.mixed_precision)
    res = train(model, drafter, dataset, cfg, args.out, eval_inputs=eval_inputs, eval_tokens=args.eval_tokens,
                tree=TreeConfig(*args.tree), resume=not args.no_resume)
    taus = ", ".join(f"epoch {e}: {t:.2f}" for e, t in res["tau_history"]) or "no held-out evaluation"
    print(f"{res['steps']} steps, last loss {res['last_loss']}; held-out tau {taus}; drafter in {args.out}/final")
    return 0


def _feature_layers(spec: str | None, model) -> list[int] | None:
    """``--feature-layers``: "eagle3" (EAGLE-3's choice for this target), "2,15,27", or None."""
    from .drafters.eagle import eagle3_layers

    if not spec:
        return None
    n = model.config.get_text_config().num_hidden_layers
    layers = eagle3_layers(n) if spec == "eagle3" else [int(x) for x in spec.split(",")]
    if any(not 0 <= i < n for i in layers):
        raise SystemExit(f"vispec: --feature-layers {spec}: the target has decoder layers 0..{n - 1}")
    return layers


def _layers_arg(spec: str) -> str:
    """argparse check of --feature-layers' form (the range is checked against the model once loaded)."""
    import argparse

    if spec != "eagle3" and not all(x.strip().isdigit() for x in spec.split(",")):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected `eagle3` or comma-separated layer indices such as 2,15,27")
    return spec


def _export(args) -> int:
    from .export import export

    try:
        res = export(args.drafter, args.out, args.format, base_only=args.as_eagle_base)
    except (ValueError, FileNotFoundError) as e:
        return _fail("export", str(e))
    print(f"{args.drafter} -> {args.out} ({res['architecture']}, {args.format}): {', '.join(res['files'])}")
    for n in res["notes"]:
        print(f"note: {n}")
    return 0


def _fail(command: str, message: str) -> int:
    print(f"vispec {command}: {message}", file=sys.stderr)
    return 2


def _read_images(command: str, paths):
    """The images at ``paths`` as RGB, or (None, exit code) after naming the unreadable one."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            return None, _fail(command, f"cannot read image {path}: {e}")
    return images, 0


def _check_sampling(command: str, args) -> int:
    """Refuses bad sampling / tree options with the option's name (0 when they are fine)."""
    import math

    from .drafters import TreeConfig
    from .sampler import Sampler

    if not args.prompt.strip():
        return _fail(command, "--prompt is empty")
    try:
        Sampler(args.temperature, getattr(args, "top_k", None), getattr(args, "top_p", None))
    except ValueError as e:
        return _fail(command, f"--{str(e).replace('_', '-')}")
    if args.tree is not None:
        try:
            TreeConfig(*args.tree)
        except ValueError as e:
            return _fail(command, f"--tree: {e}")
    return 0 if math.isfinite(args.temperature) else _fail(command, "--temperature must be finite")


def _speculate_and_compare(model, tokenizer, drafter, inputs, label: str, args, tree, compare: bool) -> int:
    """Streams a speculative answer and prints its statistics; with ``compare`` also times plain
    ``model.generate`` on the same request and (greedy) checks that both answers are identical."""
    import time

    import torch
    from transformers import TextStreamer

    from .engine import generate

    device = inputs["input_ids"].device
    sample = args.temperature > 0
    spec_kw = dict(tree=tree, temperature=args.temperature, top_k=getattr(args, "top_k", None),
                   top_p=getattr(args, "top_p", None), seed=args.seed)
    hf_kw = dict(do_sample=sample)
    if sample:  # the same distribution as vispec's: unset top-k / top-p mean none (not generate's top_k=50)
        hf_kw.update(temperature=args.temperature, top_k=spec_kw["top_k"] or 0, top_p=spec_kw["top_p"] or 1.0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up (allocator, kernels, caches) so neither timed run pays first-call costs.
    if compare:
        model.generate(**inputs, max_new_tokens=4, **hf_kw)
    generate(model, drafter, **inputs, max_new_tokens=4, **spec_kw)
    print(f"\n[{label} speculative, temperature {args.temperature:g}] {args.prompt}\n", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sync()
    t0 = time.perf_counter()
    spec = generate(model, drafter, **inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **spec_kw)
    sync()
    t_spec = time.perf_counter() - t0
    p = inputs["input_ids"].shape[1]
    n_spec = spec.sequences.shape[1] - p
    st = spec.stats
    print(f"\n{n_spec} tokens in {t_spec:.2f}s ({n_spec / t_spec:.1f} tokens/s), tau {st.tau:.2f} accepted drafts per "
          f"target forward (+1 bonus token), {st.target_forwards} target forwards")
    print(f"vispec time: prefill {st.time_prefill:.2f}s, drafting {st.time_draft:.2f}s, verification "
          f"{st.time_verify:.2f}s, other {st.time_other:.2f}s")
    if not compare:
        return 0
    torch.manual_seed(args.seed)
    sync()
    t0 = time.perf_counter()
    plain = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **hf_kw)
    sync()
    t_plain = time.perf_counter() - t0
    n_plain = plain.shape[1] - p
    rate_spec, rate_plain = n_spec / t_spec, n_plain / t_plain
    print(f"\n{'':24}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'plain model.generate':24}{n_plain:>8}{t_plain:>10.2f}{rate_plain:>10.1f}")
    print(f"{'vispec (' + label + ')':24}{n_spec:>8}{t_spec:>10.2f}{rate_spec:>10.1f}")
    print(f"speedup {rate_spec / rate_plain:.2f}x")
    text_plain = tokenizer.decode(plain[0, p:], skip_special_tokens=True)
    if not sample:
        if torch.equal(spec.sequences, plain):
            print("identical: the speculative text is token for token the text of plain greedy model.generate")
            return 0
        print(f"MISMATCH: plain greedy text was:\n{text_plain}", file=sys.stderr)
        return 1
    print("sampled: both texts are draws from the same distribution (vispec's sampling is lossless), so they differ "
          "by chance, not by method; run with --temperature 0 to compare them token for token")
    print(f"plain model.generate's sample:\n{text_plain}")
    return 0


def _demo(args) -> int:
    """Offline demo: the bundled demo VLM answers about an image twice, speculatively (streamed) and plainly."""
    from pathlib import Path

    import torch

    from .demo import DEMO_IMAGE, WEIGHTS, build_demo_vlm, demo_tree, drafter_path, load_demo_drafter, prompt
    from .drafters import TreeConfig

    images, code = _read_images("demo", [Path(args.image) if args.image else DEMO_IMAGE])
    if images is None:
        return code
    if code := _check_sampling("demo", args):
        return code
    for need in (WEIGHTS, drafter_path(args.drafter) / "config.json"):
        if not need.is_file():
            return _fail("demo", f"{need} is missing (a broken install?); `python -m vispec.demo.train_vision` and "
                         "`python -m vispec.demo.build_drafters` rebuild the demo's weights")
    tree = TreeConfig(*(args.tree or demo_tree(args.temperature)))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    print("building the demo VLM (SmolLM2-135M-Instruct + trained vision tower) ...", flush=True)
    model, processor = build_demo_vlm()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    drafter = load_demo_drafter(args.drafter, model)
    inputs = processor(text=[prompt(processor, args.prompt)], images=images, return_tensors="pt").to(device)
    return _speculate_and_compare(model, processor.tokenizer, drafter, inputs, args.drafter, args, tree, compare=True)


def _generate(args) -> int:
    """A user's own checkpoint and drafter: stream the speculative answer (``--compare``: against generate)."""
    from pathlib import Path

    import torch

    from .data import chat_prompt
    from .drafters import CONFIG_NAME, TreeConfig, load_drafter
    from .models import adapter_for

    if args.model != "demo" and not (Path(args.model) / "config.json").is_file():
        return _fail("generate", f"--model {args.model}: no config.json there (a Hugging Face checkpoint directory, or `demo`)")
    if not (Path(args.drafter) / CONFIG_NAME).is_file():
        return _fail("generate", f"--drafter {args.drafter}: no {CONFIG_NAME} there (a directory from save_pretrained)")
    images, code = _read_images("generate", args.image)
    if images is None:
        return code
    if code := _check_sampling("generate", args):
        return code
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_target(args.model, args.dtype, args.device)
    if images and not hasattr(model.config, "vision_config"):
        return _fail("generate", f"--image: {type(model).__name__} is a text-only model")
    try:
        drafter = load_drafter(args.drafter, model)
        drafter.check_target(model)
    except ValueError as e:
        return _fail("generate", f"--drafter {args.drafter}: {e}")
    text = chat_prompt(processor, args.prompt, len(images))
    kw = {"images": images} if images else {}
    inputs = processor(text=[text], return_tensors="pt", **kw)
    if "token_type_ids" not in adapter_for(model).inputs:  # tokenizers return it; only Gemma-3 takes it
        inputs.pop("token_type_ids", None)
    inputs = inputs.to(model.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    tree = TreeConfig(*args.tree) if args.tree else None
    return _speculate_and_compare(model, tokenizer, drafter, dict(inputs), Path(args.drafter).name, args, tree,
                                  compare=args.compare)


def build_parser() -> argparse.ArgumentParser:
    from .data import LONG_ANSWER_SUFFIX

    ap = argparse.ArgumentParser(prog="vispec", description="vision-aware speculative decoding")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="offline demo: the bundled VLM answers about an image, plain vs speculative")
    d.add_argument("--image", default=None, help="image file (default: the bundled scene)")
    d.add_argument("--prompt", default="Describe the image.")
    d.add_argument("--drafter", choices=["vispec", "eagle", "hivis"], default="vispec")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--tree", type=int, nargs=3, default=None, metavar=("TOTAL", "DEPTH", "TOPK"),
                   help="draft tree (default: the demo's tuned tree for the temperature, vispec.demo.demo_tree)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    d.add_argument("--device", default=None)
    d.set_defaults(func=_demo)
    gen = sub.add_parser("generate", help="your checkpoint + drafter: stream a speculative answer (--compare: vs generate)")
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint directory, or `demo`")
    gen.add_argument("--drafter", required=True, help="drafter directory (save_pretrained / vispec train's final/)")
    gen.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--tree", type=int, nargs=3, default=None, metavar=("TOTAL", "DEPTH", "TOPK"),
                     help="draft tree (default: vispec.TreeConfig())")
    gen.add_argument("--compare", action="store_true",
                     help="also time plain model.generate on the same request; at temperature 0, check identity")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    gen.add_argument("--dtype", choices=DTYPES, default="auto")
    gen.add_argument("--device", default=None)
    gen.set_defaults(func=_generate)
    data = sub.add_parser("data", help="drafter training data").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("generate", help="answer samples with the target and store shards for training (resumable)")
    g.add_argument("--model", required=True, help="target checkpoint directory, or `demo`")
    g.add_argument("--data", required=True, help="LLaVA-style JSON/JSONL (image + conversations) or ShareGPT-style text")
    g.add_argument("--images-root", default=None, help="directory the samples' image paths are relative to")
    g.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    g.add_argument("--suffix", default=LONG_ANSWER_SUFFIX, help="appended to every instruction ('' for none)")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--shard-size", type=int, default=64, help="samples per shard file")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--limit", type=int, default=None, help="only the first N samples")
    g.add_argument("--answers", default=None,
                   help="JSONL log of the answers' token ids (a few kB per sample): samples it holds are not generated "
                        "again (one forward each rebuilds their shards), new answers are appended")
    g.add_argument("--feature-layers", default=None, type=_layers_arg,
                   help="also store the hidden states entering these target layers (EAGLE-3 heads read them): "
                        "`eagle3` for EAGLE-3's choice, or e.g. 2,15,27")
    g.add_argument("--dtype", choices=DTYPES, default="auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=_data_generate)

    t = sub.add_parser("train", help="train a drafter on shards from `vispec data generate` (resumable)")
    t.add_argument("--model", required=True, help="target checkpoint directory, or `demo`")
    t.add_argument("--data", required=True, help="shard directory written by `vispec data generate` (with --online: "
                                                 "the JSON / JSONL samples that command reads)")
    t.add_argument("--online", action="store_true",
                   help="run the frozen target in the training loop (no shards on disk: only the answers' token ids)")
    t.add_argument("--max-new-tokens", type=int, default=1024, help="--online: answer length")
    t.add_argument("--temperature", type=float, default=0.0, help="--online: answers' temperature (0 = greedy)")
    t.add_argument("--answer-batch-size", type=int, default=4, help="--online: prompts answered per generate call")
    t.add_argument("--drafter", choices=["vispec", "hivis", "eagle"], default="vispec")
    t.add_argument("--out", required=True, help="checkpoints (checkpoint-*/) and the final drafter (final/)")
    t.add_argument("--init", default=None, help="start from this drafter (stage 2 from a stage-1 EAGLE head)")
    t.add_argument("--stage", type=lambda v: int(v) if v.isdigit() else v, choices=[1, 2, "hivis"], default=1,
                   help="1: feature + soft CE, 2: ViSpec (10 x probability L1 + 0.1 x ListMLE), hivis: HiViS's "
                        "multi-step self-feedback with dynamic data selection")
    t.add_argument("--hivis-residuals", type=int, default=0,
                   help="HiViS drafters: step-dependent residual vectors (0: the plain text-only drafter)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: one epoch")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-clip", type=float, default=0.5)
    t.add_argument("--generation", type=int, choices=[2, 3], default=2,
                   help="drafter head: 2 = EAGLE-2 (last hidden state), 3 = EAGLE-3 (three target layers fused)")
    t.add_argument("--feature-layers", default=None, type=_layers_arg,
                   help="EAGLE-3: target layers read, e.g. 2,15,27 (default: those the shards hold)")
    t.add_argument("--passes", type=int, default=None,
                   help="1 + number of self-correction passes (default: 2 for EAGLE-2 heads, 1 for EAGLE-3)")
    t.add_argument("--ttt-steps", type=int, default=None,
                   help="training-time test unroll (default: 7 for EAGLE-3 heads, 1 for EAGLE-2)")
    t.add_argument("--no-noise", action="store_true", help="no EAGLE feature noise")
    t.add_argument("--num-q", type=int, default=2, help="ViSpec queries per image")
    t.add_argument("--draft-vocab", type=int, default=0,
                   help="draft only the N most frequent answer tokens of --data (0: the whole vocabulary)")
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

    from .bench import SUITES

    bn = sub.add_parser("bench", help="the benchmarks: kernels (op microbenchmarks), linear (few-row CPU linear), e2e (end to end), drafters, "
                        "attention (where a drafter attends: image or text)", add_help=False)
    bn.add_argument("suite", choices=list(SUITES))
    bn.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (vispec bench SUITE --help)")
    bn.set_defaults(func=lambda a: __import__("vispec.bench", fromlist=["main"]).main(a.suite, a.rest))

    x = sub.add_parser("export", help="write a drafter in the layout SGLang or vLLM serve (EAGLE-2 / EAGLE-3 heads)")
    x.add_argument("--format", choices=["sglang", "vllm"], required=True)
    x.add_argument("--as-eagle-base", action="store_true",
                   help="ViSpec / HiViS drafters: export their EAGLE head alone (the engines cannot run the rest)")
    x.add_argument("drafter", help="a vispec drafter directory (save_pretrained / vispec train's final/)")
    x.add_argument("out", help="output directory")
    x.set_defaults(func=_export)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "shard_size", "epochs", "passes", "ttt_steps", "eval_tokens",
                 "answer_batch_size"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            print(f"vispec: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "draft_vocab", 0) < 0:
        print("vispec: --draft-vocab must be >= 0", file=sys.stderr)
        return 2
    if getattr(args, "draft_vocab", 0) and getattr(args, "init", None):
        print("vispec: --draft-vocab applies to a new drafter; one from --init keeps its own vocabulary", file=sys.stderr)
        return 2
    if getattr(args, "threads", None) is not None and args.threads < 1:
        print("vispec: --threads must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
