"""Which facts the demo VLM gets wrong on held-out scenes, per kind (count / object / place / word).

    python scripts/demo_vision_errors.py --image-tokens 576 --scenes 24
"""
import argparse
import random

import torch

from vispec.demo import EVAL_SEED, build_demo_vlm, prompt
from vispec.demo.model import GEOMETRY, vision_weights_path
from vispec.demo.scenes import fact_checks, make_scene
from vispec.demo.model import scene_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-tokens", type=int, choices=sorted(GEOMETRY), default=576)
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--show", type=int, default=10, help="wrong answers to print")
    args = ap.parse_args(argv)
    model, proc = build_demo_vlm(vision_weights_path(args.image_tokens), image_tokens=args.image_tokens)
    tok = proc.tokenizer
    tok.padding_side = "left"
    totals = {}
    wrong = []
    for i in range(0, args.scenes, 8):
        scenes = [make_scene(random.Random(EVAL_SEED + j), size=scene_size(model)) for j in range(i, min(args.scenes, i + 8))]
        enc = proc(text=[prompt(proc)] * len(scenes), images=[s.image for s in scenes], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=64, do_sample=False)
        for s, ans in zip(scenes, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            checks = fact_checks(ans, s)
            for k, (g, t) in checks.items():
                totals.setdefault(k, [0, 0])
                totals[k][0] += g
                totals[k][1] += t
            if any(g < t for g, t in checks.values()):
                wrong.append((s.description(), ans))
    for k, (g, t) in totals.items():
        print(f"{k}: {g}/{t} = {g / max(t, 1):.0%}")
    for truth, ans in wrong[: args.show]:
        print(f"- truth: {truth}\n  said:  {ans}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
