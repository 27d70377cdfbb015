"""Trains the demo VLM's vision tower and projector (the language model stays frozen) on generated scenes.

    python -m vispec.demo.train_vision --steps 400 --out vispec/demo/weights/vision.safetensors

Every step draws fresh scenes (seeds below 10**7); the held-out scenes (seeds from
10**7) are described greedily and scored fact by fact (``vispec.demo.scenes.score``).
The loss covers the description tokens only. Saves (atomically) every ``--save-every``
steps, so an interrupted run keeps its last weights; ``--resume`` continues from them.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .model import WEIGHTS, build_demo_vlm, prompt, vision_state_dict
from .scenes import make_scene, score

EVAL_SEED = 10**7


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
        scenes = [make_scene(random.Random(EVAL_SEED + j)) for j in range(i, min(n, i + 8))]
        enc = processor(text=[prompt(processor)] * len(scenes), images=[s.image for s in scenes], return_tensors="pt",
                        padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for s, ans in zip(scenes, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            g, t = score(ans, s)
            good, total = good + g, total + t
    return good / max(total, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--eval", type=int, default=40, help="held-out scenes scored at the end")
    ap.add_argument("--resume", action="store_true", help="start from the weights at --out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = build_demo_vlm(args.out if args.resume else None)
    model.to(device)
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / args.steps))
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        from safetensors.torch import save_file

        tmp = args.out.with_suffix(".tmp")
        save_file(vision_state_dict(model), str(tmp))
        os.replace(tmp, args.out)

    bar = tqdm(range(args.steps), desc="vision tower + projector")
    t0 = time.time()
    for step in bar:
        model.train()
        scenes = [make_scene(random.Random(rng.randrange(EVAL_SEED))) for _ in range(args.batch_size)]
        inputs, labels = batch_for(processor, scenes, device)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if (step + 1) % args.save_every == 0:
            save()
    save()
    acc = evaluate(model, processor, args.eval)
    print(f"trained {args.steps} steps in {time.time() - t0:.0f}s; held-out fact accuracy {acc:.1%} over {args.eval} scenes")


if __name__ == "__main__":
    main()
