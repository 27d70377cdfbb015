"""Which facts the demo VLM gets wrong on held-out scenes (count / object / place / word): python scripts/demo_vision_errors.py [N]."""
import random, re, sys
import torch
from vispec.demo import EVAL_SEED, build_demo_vlm, prompt
from vispec.demo.model import vision_weights_path
from vispec.demo.scenes import NUMBERS, _at, make_scene
torch.set_num_threads(1)
model, proc = build_demo_vlm(vision_weights_path(576), image_tokens=576)
tok = proc.tokenizer; tok.padding_side = "left"
kinds = {"count": [0, 0], "object": [0, 0], "place": [0, 0], "word": [0, 0]}
bad = []
n = int(sys.argv[1]) if len(sys.argv) > 1 else 24
for i in range(0, n, 8):
    scenes = [make_scene(random.Random(EVAL_SEED + j)) for j in range(i, min(n, i + 8))]
    enc = proc(text=[prompt(proc)] * len(scenes), images=[s.image for s in scenes], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    for s, ans in zip(scenes, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
        a = ans.lower()
        k = len(s.objects)
        ok = bool(re.search(rf"\b{NUMBERS[k]} shapes?\b", a)); kinds["count"][0] += ok; kinds["count"][1] += 1
        for c, sh, p in s.objects:
            m = re.search(rf"\b{c} {sh}\b(.{{0,30}})", a)
            kinds["object"][0] += bool(m); kinds["object"][1] += 1
            kinds["place"][0] += bool(m and re.match(rf"\s*{re.escape(_at(p))}(?! (left|right))\b", m.group(1))); kinds["place"][1] += 1
            if not m: bad.append(("object", f"{c} {sh} @ {p}", ans[:120]))
        if s.word:
            ok = bool(re.search(rf'word "?{s.word}"?', a)); kinds["word"][0] += ok; kinds["word"][1] += 1
            if not ok: bad.append(("word", s.word, ans[:120]))
for k, (g, t) in kinds.items():
    print(f"{k}: {g}/{t} = {g / max(t, 1):.0%}")
for b in bad[:12]:
    print(b)
