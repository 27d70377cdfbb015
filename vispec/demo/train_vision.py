"""Trains the demo VLM's vision tower and projector (the language model stays frozen) on generated scenes.

    python -m vispec.demo.train_vision --out vispec/demo/weights/vision.safetensors   # ~25 min on 2 CPU cores
    python -m vispec.demo.train_vision --image-tokens 576 --resume \
        --out vispec/demo/weights/vision-576.safetensors                              # hours: run it in chunks
    python -m vispec.demo.train_vision --image-tokens 576 --init OLD.safetensors --empty-weight 0.2 --resume \
        --out vispec/demo/weights/vision-576.safetensors                              # fine-tune both stages

Two stages, because a frozen LM given 36 random image embeddings learns to ignore them
(it settles on one fixed description: that was the outcome of training on the
description loss alone, ~10% of facts right after 500 steps).

1. ``read`` (no LM forward, fast): the image's n embeddings are taught to *be* word
   embeddings of the LM: cell k of the 3 x 3 grid owns the k-th ninth of them (4 with
   36 image tokens, 64 with 576) and they should read, in turn, " red", " circle", " top",
   " left" (an object), " word", " cat", place (a written word) or " empty" x 4; with more
   than 4 tokens per cell the four words repeat, so most image tokens are redundant, as in
   a real VLM. Loss: cross-entropy of their dot products with the
   LM's (tied) embedding rows of those words, plus a small MSE to the row itself so the
   scale matches text. A frozen LM already attends to and copies text it is given.
2. ``describe``: the language-model loss on the scene's description (its tokens only),
   with the reading loss kept as a regulariser.

Every step draws fresh scenes (seeds below 10**7); held-out scenes (seeds from 10**7)
are described greedily and scored fact by fact (``vispec.demo.scenes.score``). Every
``--save-every`` steps the weights (``--out``) and a checkpoint beside them (``.ckpt.pt``:
stage, step, optimizer, schedule and scene RNG) are written atomically; ``--resume``
continues from the checkpoint exactly where it stopped (or, without one, from the weights
at ``--out``, skipping stage 1), and ``--max-minutes`` stops cleanly after a checkpoint, so
a long run fits into sessions of limited length.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .model import (DEFAULT_IMAGE_TOKENS, GEOMETRY, build_demo_vlm, image_tokens_of, prompt, scene_size, vision_state_dict,
                    vision_weights_path)
from . import EVAL_SEED
from .scenes import PLACES, make_scene, score

EMPTY = "empty"


def slot_words(scene, image_tokens: int = 36) -> list[str]:
    """The words the image embeddings should read in stage 1: each grid cell (reading order) owns
    image_tokens / 9 consecutive embeddings, which read the cell's four words in turn."""
    per_cell = image_tokens // len(PLACES)
    if per_cell * len(PLACES) != image_tokens or per_cell % 4:
        raise ValueError(f"{image_tokens} image tokens do not split into 9 cells of 4k tokens")
    cells = [[EMPTY] * 4 for _ in PLACES]
    for c, s, p in scene.objects:
        cells[PLACES.index(p)] = [c, s, *_place_pair(p)]
    if scene.word:
        cells[PLACES.index(scene.word_place)] = ["word", scene.word, *_place_pair(scene.word_place)]
    return [cell[i % 4] for cell in cells for i in range(per_cell)]


def _place_pair(place: str) -> list[str]:
    words = place.split()
    return [words[0], words[-1]]


def slot_vocab(tok) -> tuple[list[str], torch.Tensor]:
    """Every word a slot can read, and its (single) token id with a leading space."""
    from .scenes import COLORS, SHAPES, WORDS

    words = sorted({EMPTY, "word", *COLORS, *SHAPES, *WORDS, *(w for p in PLACES for w in p.split())})
    ids = []
    for w in words:
        t = tok.encode(" " + w, add_special_tokens=False)
        if len(t) != 1:
            raise ValueError(f"slot word {w!r} is {len(t)} tokens in this tokenizer; stage 1 needs single tokens")
        ids.append(t[0])
    return words, torch.tensor(ids)


def read_loss(model, processor, scenes, vocab, device, empty_weight: float = 1.0):
    """(loss, slot accuracy, accuracy over the slots of occupied cells) of stage 1: image embeddings vs
    the LM's embedding rows of their slot words. ``empty_weight`` < 1 down-weights the slots of empty
    cells (about 3/4 of all, and trivial), so the loss is about the shapes and words."""
    words, ids = vocab
    index = {w: i for i, w in enumerate(words)}
    n = image_tokens_of(model)
    target = torch.tensor([[index[w] for w in slot_words(s, n)] for s in scenes], device=device)  # (B, n)
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"].to(device)
    feats = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output).float()  # (B, n, hidden)
    rows = model.get_input_embeddings().weight[ids.to(device)].detach()  # (V_slot, hidden)
    logits = feats @ rows.T  # what the tied lm_head would score, restricted to the slot words
    filled = target != index[EMPTY]
    w = torch.where(filled, 1.0, empty_weight)  # (B, n)
    ce = (torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none") * w.flatten()).sum()
    mse = ((feats - rows[target]).pow(2).sum(-1) * w).sum()
    hit = logits.argmax(-1) == target
    return (ce + 0.1 * mse) / w.sum(), float(hit.float().mean()), float(hit[filled].float().mean())


def batch_for(processor, scenes, device):
    tok = processor.tokenizer
    tok.padding_side = "right"
    head = prompt(processor)
    texts = [head + s.description() + tok.eos_token for s in scenes]
    enc = processor(text=texts, images=[s.image for s in scenes], return_tensors="pt", padding=True)
    n_head = len(processor(text=[head], images=[scenes[0].image], return_tensors="pt")["input_ids"][0])
    labels = enc["input_ids"].clone()
    labels[:, :n_head] = -100  # the prompt (image included) is given, not learned
    labels[enc["attention_mask"] == 0] = -100
    return {k: v.to(device) for k, v in enc.items()}, labels.to(device)


@torch.no_grad()
def evaluate(model, processor, n: int = 40, max_new_tokens: int = 64) -> float:
    """Fraction of the facts of n held-out scenes that the model's greedy descriptions get right."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    model.eval()
    good = total = 0
    for i in range(0, n, 8):
        scenes = [make_scene(random.Random(EVAL_SEED + j), size=scene_size(model)) for j in range(i, min(n, i + 8))]
        enc = processor(text=[prompt(processor)] * len(scenes), images=[s.image for s in scenes], return_tensors="pt",
                        padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for s, ans in zip(scenes, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            g, t = score(ans, s)
            good, total = good + g, total + t
    return good / max(total, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, choices=sorted(GEOMETRY), help="image tokens per image")
    ap.add_argument("--read-steps", type=int, default=2000, help="stage 1 steps (no LM forward)")
    ap.add_argument("--read-batch-size", type=int, default=32)
    ap.add_argument("--read-lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=300, help="stage 2 steps (description loss through the frozen LM)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--read-weight", type=float, default=0.5, help="stage 1 loss kept in stage 2, times this")
    ap.add_argument("--empty-weight", type=float, default=1.0,
                    help="weight of the empty cells' slots in the stage 1 loss (< 1: the loss is about shapes and words)")
    ap.add_argument("--bf16", action="store_true", help="stage 2 forward/backward under bfloat16 autocast")
    ap.add_argument("--out", type=Path, default=None, help="default: the package's file for --image-tokens")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--eval", type=int, default=48, help="held-out scenes scored after each stage")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint beside --out (without one: from the weights at --out, skipping stage 1)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start both stages from these vision weights (a fine-tuning run: e.g. with a new --empty-weight)")
    ap.add_argument("--max-minutes", type=float, default=0, help="> 0: stop after the first checkpoint past this time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out = args.out or vision_weights_path(args.image_tokens)
    for name in ("read_steps", "steps", "eval", "save_every", "batch_size", "read_batch_size"):
        if getattr(args, name) < (1 if name in ("save_every", "batch_size", "read_batch_size") else 0):
            ap.error(f"--{name.replace('_', '-')} must be >= {1 if name in ('save_every', 'batch_size', 'read_batch_size') else 0}")
    ckpt_path = args.out.with_suffix(".ckpt.pt")
    ckpt = torch.load(ckpt_path, weights_only=False) if args.resume and ckpt_path.is_file() else None
    if not 0 <= args.empty_weight <= 1:
        ap.error("--empty-weight must be in [0, 1]")
    if args.init is not None and not args.init.is_file():
        ap.error(f"--init {args.init}: no such vision weights file")
    if ckpt is not None and ckpt["image_tokens"] != args.image_tokens:
        ap.error(f"{ckpt_path} is a run with {ckpt['image_tokens']} image tokens, not {args.image_tokens}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    # --resume without a checkpoint continues from the weights at --out (stage 2 only), unless --init says where to start
    start_weights = args.out if args.resume and ckpt is None and args.init is None and args.out.is_file() else None
    model, processor = build_demo_vlm(start_weights or args.init, image_tokens=args.image_tokens)
    model.to(device)
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters() if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    params = [model.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    vocab = slot_vocab(processor.tokenizer)
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t_begin = time.time()

    def save_weights(complete=False):
        from safetensors.torch import save_file

        tmp = args.out.with_suffix(".tmp")
        meta = {"image_tokens": str(args.image_tokens), **({"complete": "1"} if complete else {})}
        # fp16 halves what the package ships; the model runs in fp32 (weights are upcast on load)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in vision_state_dict(model).items()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, args.out)

    def save(stage, step, opt, sched):
        save_weights()
        state = {"image_tokens": args.image_tokens, "stage": stage, "step": step, "vision": vision_state_dict(model),
                 "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.getstate(),
                 "torch_rng": torch.get_rng_state()}
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)

    def scenes(n):
        return [make_scene(random.Random(rng.randrange(EVAL_SEED)), size=scene_size(model)) for _ in range(n)]

    def run(stage, steps, lr, loss_fn) -> bool:
        """Runs (or finishes) one stage; False if --max-minutes stopped it at a checkpoint."""
        if steps == 0:
            return True
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
        first = 0
        if ckpt is not None and ckpt["stage"] == stage:
            model.load_state_dict(ckpt["vision"], strict=False)
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            rng.setstate(ckpt["rng"])
            torch.set_rng_state(ckpt["torch_rng"])
            first = ckpt["step"]
        if first >= steps:
            return True
        bar = tqdm(range(first, steps), desc=stage, initial=first, total=steps)
        t0 = time.time()
        for step in bar:
            model.train()
            loss, shown = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **shown)
            if (step + 1) % args.save_every == 0 or step + 1 == steps:
                save(stage, step + 1, opt, sched)
                if args.max_minutes and time.time() - t_begin > 60 * args.max_minutes and step + 1 < steps:
                    print(f"{stage}: stopped at step {step + 1}/{steps} (--max-minutes); --resume continues", flush=True)
                    return False
        acc = evaluate(model, processor, args.eval) if args.eval else float("nan")
        print(f"{stage}: steps {first}..{steps} in {time.time() - t0:.0f}s; held-out fact accuracy {acc:.1%} "
              f"over {args.eval} scenes", flush=True)
        return True

    def read_step():
        loss, acc, filled = read_loss(model, processor, scenes(args.read_batch_size), vocab, device, args.empty_weight)
        return loss, {"slot_acc": f"{acc:.2f}", "filled": f"{filled:.2f}"}

    def describe_step():
        batch = scenes(args.batch_size)
        inputs, labels = batch_for(processor, batch, device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
            lm = model(**inputs, labels=labels).loss
            loss = lm
            if args.read_weight:
                rl, _, _ = read_loss(model, processor, batch, vocab, device, args.empty_weight)
                loss = lm + args.read_weight * rl
        return loss, {"lm": f"{float(lm.detach()):.3f}"}

    stages = [("2/2 describe", args.steps, args.lr, describe_step)]
    if not (args.resume and ckpt is None and start_weights is not None):
        stages.insert(0, ("1/2 read", args.read_steps, args.read_lr, read_step))
    if ckpt is not None:  # stages before the checkpoint's are done
        stages = stages[[s[0] for s in stages].index(ckpt["stage"]):]
    for stage in stages:
        if not run(*stage):
            return 3
    save_weights(complete=True)  # marks the file finished (the sweep and --resume read it)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
