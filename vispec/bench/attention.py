"""Where a drafter's attention goes: image positions against text positions, on the demo VLM.

    vispec bench attention --image-tokens 576 --drafters DIR [DIR ...] --images 8

The ViSpec paper's Section 4.1 argues that a shallow drafter drowns in long, redundant runs of image
tokens: its one attention layer spreads its mass over hundreds of near-duplicate image keys. This
measures it. For held-out scenes (seeds EVAL_SEED + i, as the e2e benchmark's) the demo VLM answers
greedily; the record of prompt + answer (the target's features, as training sees them) goes through
each drafter teacher-forced, and for every answer position the drafter's attention distribution
(averaged over heads) is summarised:

* image mass: the attention probability on drafter positions whose input token is an image token
  (EAGLE-2: every image position; ViSpec: its few compressed tokens; HiViS: none, so 0),
* entropy (nats) of the whole distribution, and of its image part renormalised (how evenly the
  image mass spreads: log(number of image keys) is the most even),
* the number of image and text keys an answer position sees.

With ``--sampled`` (default 8) it also measures what the *target* leaves to any drafter at temperature 1:
the demo VLM samples an answer per scene (T=1, no top-k, as vispec verifies), and for each answer position t
and depth d the record is whether the d sampled tokens from t on each lie in the target's own top-k (the
tree's branching) at their position. A tree with k children per node accepts d drafts at t only if they do
(the verifier emits tokens distributed as the target's, and a token not in the tree ends the walk), so the
fraction per depth is a ceiling on "accepted at least d" for *every* drafter with that tree, and its sum a
ceiling on tau, whatever the drafter's quality.

Writes ``<results>/drafter-attention-<N>-<device>.md``.
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from vispec.bench import device_label, results_dir


def attention_stats(drafter, rec: dict, embed) -> dict:
    """Mean over the answer positions of ``rec`` (a training record) of the drafter's attention summary."""
    from vispec.train import sample_to_inputs

    inputs, tg = sample_to_inputs(rec, embed, getattr(drafter, "feature_layers", None))
    layer = drafter.layer
    seen = {}
    attend = layer.attend

    def capture(residual, q, keys, values, visible):
        seen.update(q=q, k=keys, visible=visible)
        return attend(residual, q, keys, values, visible)

    layer.attend = capture
    try:
        with torch.no_grad():
            _, pos = drafter.forward_sequence(inputs)
    finally:
        del layer.attend
    q, k, visible = seen["q"][0].float(), seen["k"][0].float(), seen["visible"][0]
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)  # GQA: each query head's key head
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~visible.unsqueeze(0), float("-inf")), -1).mean(0)  # (T, S)
    ids, img = rec["input_ids"], rec["image_mask"].bool()
    # Drafter position t (original position p) reads the embedding of token p + 1 where the drafter keeps the
    # sequence as it is (EAGLE; ViSpec's compressed tokens sit at the image positions they replace): an image
    # key when that token is an image token. A drafter that closes the gap after a position (HiViS's text
    # position before the image pairs with the next text token) reads no image there.
    pos = pos.cpu()
    nxt = (pos + 1).clamp(max=len(ids) - 1)
    kept = torch.cat([pos[1:] == pos[:-1] + 1, torch.ones(1, dtype=torch.bool)])
    key_img = img[nxt] & kept
    answer = rec["loss_mask"].bool()[nxt] & (pos + 1 < len(ids))
    rows = answer.nonzero().squeeze(1)
    p = probs[rows]  # (A, S)
    mass = p[:, key_img].sum(-1)
    ent = -(p.clamp_min(1e-30).log() * p).sum(-1)
    pi = p[:, key_img] / mass.clamp_min(1e-30).unsqueeze(-1)
    ent_img = -(pi.clamp_min(1e-30).log() * pi).sum(-1) if bool(key_img.any()) else torch.zeros_like(mass)
    return dict(image_mass=float(mass.mean()), entropy=float(ent.mean()), image_entropy=float(ent_img.mean()),
                image_keys=int(key_img.sum()), text_keys=float(visible[rows].sum(-1).float().mean()) - int(key_img.sum()),
                positions=int(rows.numel()))


def topk_ceiling(model, inp: dict, seqs: torch.Tensor, k: int, depth: int) -> list[tuple[int, int]]:
    """(hits, positions) per depth d = 1..depth: answer positions t of ``seqs`` whose sampled tokens t..t+d-1
    are each among the target's top-``k`` at their position (see the module docstring: a ceiling for any
    drafter on a tree with ``k`` children per node)."""
    p = inp["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**{**inp, "input_ids": seqs, "attention_mask": torch.ones_like(seqs)}).logits[0].float()
    answer = seqs[0, p:]
    top = logits[p - 1 : seqs.shape[1] - 1].topk(k, -1).indices  # (A, k): position p-1+j predicts answer[j]
    inside = (top == answer[:, None]).any(-1).tolist()
    out = []
    for d in range(1, depth + 1):
        starts = range(len(inside) - d + 1)
        out.append((sum(all(inside[t : t + d]) for t in starts), len(starts)))
    return out


def main(argv=None) -> int:
    from vispec.data import sequence_records
    from vispec.demo import DEMO_TREE, EVAL_SEED, PROMPTS, build_demo_vlm, drafter_label, drafter_names, drafters_dir, prompt
    from vispec.demo.model import DEFAULT_IMAGE_TOKENS, GEOMETRY, scene_size, vision_weights_path
    from vispec.demo.scenes import make_scene
    from vispec.drafters import load_drafter
    from vispec.models import adapter_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS, choices=sorted(GEOMETRY))
    ap.add_argument("--vision-weights", type=Path, default=None, help="default: the package's for --image-tokens")
    ap.add_argument("--drafters", type=Path, nargs="+", default=None,
                    help="folders of demo drafters (default: the package's for --image-tokens)")
    ap.add_argument("--images", type=int, default=8, help="held-out scenes (one prompt each, in turn)")
    ap.add_argument("--max-new", type=int, default=96, help="answer tokens per scene")
    ap.add_argument("--sampled", type=int, default=8,
                    help="held-out scenes whose T=1 answers measure the target's top-k ceiling (0: not measured)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.images < 1 or args.max_new < 1 or args.sampled < 0:
        ap.error("--images and --max-new must be >= 1, --sampled >= 0")
    folders = args.drafters or [drafters_dir(args.image_tokens)]
    found = [(f, k) for f in folders for k in drafter_names((2, 3)) if (f / k / "config.json").is_file()]
    if not found:
        ap.error(f"{', '.join(map(str, folders))}: no demo drafter there ({', '.join(drafter_names((2, 3)))})")
    model, processor = build_demo_vlm(args.vision_weights or vision_weights_path(args.image_tokens),
                                      image_tokens=args.image_tokens)
    adapter = adapter_for(model)
    tok = processor.tokenizer
    records = []
    for i in range(args.images):
        scene = make_scene(random.Random(EVAL_SEED + i), size=scene_size(model))
        inp = dict(processor(text=[prompt(processor, PROMPTS[i % len(PROMPTS)])], images=[scene.image], return_tensors="pt"))
        with torch.no_grad():
            seqs = model.generate(**inp, max_new_tokens=args.max_new, do_sample=False)
            records += sequence_records(adapter, inp, seqs, tok.pad_token_id)
    embed = model.get_input_embeddings()
    rows = []
    for folder, name in found:
        d = load_drafter(folder / name, model)
        stats = [attention_stats(d, r, embed) for r in records]
        n = sum(s["positions"] for s in stats)
        avg = {k: sum(s[k] * s["positions"] for s in stats) / max(n, 1) for k in stats[0] if k != "positions"}
        rows.append((f"{drafter_label(name)}" + (f" [{folder.name}]" if len(folders) > 1 else ""), avg, n))
    label = device_label()
    lines = [f"# Drafter attention over image and text positions, demo VLM with {args.image_tokens} image tokens ({label})",
             "", f"{args.images} held-out scenes, greedy answers of up to {args.max_new} tokens, teacher-forced; per "
             "answer position, the drafter's attention averaged over heads. Image mass: probability on image keys; "
             "entropies in nats (log of the image keys' count is the most even spread).", "",
             "| drafter | image keys | text keys (mean) | image mass | entropy | image-part entropy (max) | "
             "answer positions |", "|---|---|---|---|---|---|---|"]
    for name, a, n in rows:
        most = math.log(a["image_keys"]) if a["image_keys"] > 1 else 0.0
        lines.append(f"| {name} | {a['image_keys']:.0f} | {a['text_keys']:.0f} | {a['image_mass']:.3f} | "
                     f"{a['entropy']:.2f} | {a['image_entropy']:.2f} ({most:.2f}) | {n} |")
    if args.sampled:
        _, depth, k = DEMO_TREE
        hits = [[0, 0] for _ in range(depth)]
        for i in range(args.sampled):
            scene = make_scene(random.Random(EVAL_SEED + i), size=scene_size(model))
            inp = dict(processor(text=[prompt(processor, PROMPTS[i % len(PROMPTS)])], images=[scene.image],
                                 return_tensors="pt"))
            torch.manual_seed(i)
            with torch.no_grad():
                seqs = model.generate(**inp, max_new_tokens=args.max_new, do_sample=True, temperature=1.0, top_k=0)
            for h, (a, n) in zip(hits, topk_ceiling(model, inp, seqs, k, depth)):
                h[0] += a
                h[1] += n
        frac = [a / max(n, 1) for a, n in hits]
        lines += ["", f"## What the target leaves to any drafter at temperature 1 (top-{k} ceiling)", "",
                  f"{args.sampled} held-out scenes, answers sampled at T=1 (no top-k) of up to {args.max_new} tokens "
                  f"({hits[0][1]} positions). Fraction of positions whose next d sampled tokens each lie in the target's "
                  f"own top-{k}: no drafter on a tree with {k} children per node accepts d drafts more often. "
                  "Compare with the e2e benchmark's 'acceptance per draft depth' at T=1.", "",
                  "| | " + " | ".join(f"d={d + 1}" for d in range(depth)) + " | tau ceiling (sum) |",
                  "|---|" + "---|" * (depth + 1),
                  "| ceiling | " + " | ".join(f"{f:.2f}" for f in frac) + f" | {sum(frac):.2f} |"]
    out = args.out or results_dir() / f"drafter-attention-{args.image_tokens}-{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
