"""End-to-end speed of vispec against model.generate and HF prompt-lookup decoding.

    vispec bench e2e                 # medium random-weight LLaVA and Qwen2.5-VL (CPU-sized)
    vispec bench e2e --suite 7b        # real-size LLaVA-1.6-7B / Qwen2.5-VL-7B shapes (GPU)
    vispec bench e2e --quick           # fewer prompts and tokens
    vispec bench e2e --suite demo      # the real demo VLM and its trained drafters (see run_demo)

For each model it times, on the same prompts in the same run:
  * ``model.generate`` greedy (the baseline of every speedup),
  * HF prompt lookup decoding (``prompt_lookup_num_tokens=10``),
  * vispec with an untrained EAGLE drafter (random weights: tau ~ 0, shows the cost
    of drafting when nothing is accepted),
  * vispec with the oracle drafter (``vispec.drafters.OracleDrafter``) proposing the
    target's greedy continuation with acceptance 1.0 / 0.8 / 0.5 / 0.0, which fixes tau
    and isolates the engine: efficiency = speedup / (tau + 1), 1.0 meaning a verify
    forward of the whole tree costs what one plain decoding step costs.

Every speculative output is checked token-identical to the baseline. tau counts
accepted draft tokens per target forward, the bonus token excluded. Prefill is
included in every time (each method pays it once); "decode-only speedup" removes
the prefill time (measured as generate with max_new_tokens=1) from both sides,
since speculative decoding only speeds up decoding. Writes
<results>/e2e-<suite>-<device>.md and a PNG of speedup against tau.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import zip_longest
from pathlib import Path

import torch
from tqdm import tqdm

import vispec
from vispec.drafters import OracleDrafter, TreeConfig

from vispec.bench import device_label, results_dir
IMAGE_TOKEN = 31000


def text_config(suite):
    if suite == "7b":
        return dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return dict(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)


def build_llava(suite, dtype, device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextForConditionalGeneration, LlavaNextConfig

    vision = (CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14, projection_dim=768)
              if suite == "7b" else
              CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                               image_size=336, patch_size=14, projection_dim=256))
    text = LlamaConfig(**text_config(suite), pad_token_id=0, eos_token_id=None, bos_token_id=None)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=[[336, 336], [336, 672], [672, 336]])
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def llava_prompt(model, n_text, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    pixel = torch.randn(1, 3, 3, 336, 336, generator=g).to(device, dtype)
    sizes = torch.tensor([[336, 672]], device=device)
    with torch.no_grad():
        n_img = model.model.get_image_features(pixel, sizes).pooler_output[0].shape[0]
    text = torch.randint(1, 30000, (n_text,), generator=g)
    ids = torch.cat([text[:4], torch.full((n_img,), IMAGE_TOKEN), text[4:]]).unsqueeze(0).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel, "image_sizes": sizes}


def build_qwen(suite, dtype, device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if suite == "7b":
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=8192)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, num_heads=16)
    else:
        text = dict(vocab_size=32064, hidden_size=448, intermediate_size=1216, num_hidden_layers=8,
                    num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=4096)
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, out_hidden_size=448, num_heads=2)
    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    sec = [head_half // 4, (head_half - head_half // 4) // 2]
    sec.append(head_half - sum(sec))
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sec},
                pad_token_id=0, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=[1] if suite != "7b" else [7, 15, 23, 31])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                           video_token_id=IMAGE_TOKEN + 1, vision_start_token_id=IMAGE_TOKEN + 2)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def qwen_prompt(model, n_text, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    grid = (1, 24, 24)  # a 336 x 336 image: 576 patches, 144 tokens after the 2 x 2 merge
    n_img = grid[0] * grid[1] * grid[2] // 4
    text = torch.randint(1, 30000, (n_text,), generator=g)
    ids = torch.cat([text[:4], torch.tensor([IMAGE_TOKEN + 2]), torch.full((n_img,), IMAGE_TOKEN), text[4:]])
    ids = ids.unsqueeze(0).to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g).to(device, dtype),
        "image_grid_thw": torch.tensor([grid], device=device),
    }


MODELS = {"LLaVA-NeXT": (build_llava, llava_prompt), "Qwen2.5-VL": (build_qwen, qwen_prompt)}


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def run_model(name, args, device, dtype):
    build, make_prompt = MODELS[name]
    model = build(args.suite, dtype, device)
    prompts = [make_prompt(model, 24 + 8 * i, i, device, dtype) for i in range(args.prompts)]
    max_new = args.max_new
    rows = []
    # Warm-up (allocator, first-call overheads) outside the timings.
    model.generate(**prompts[0], max_new_tokens=4, do_sample=False)

    # Prefill (+ first token) time per prompt, the same work for every method: subtracted for decode speed.
    prefill = sum(timed(lambda: model.generate(**p, max_new_tokens=1, do_sample=False), device)[1] for p in prompts)
    base_t, refs = [], []
    for p in prompts:
        out, t = timed(lambda: model.generate(**p, max_new_tokens=max_new, do_sample=False), device)
        base_t.append(t)
        refs.append(out)
    base = sum(base_t)
    n_tokens = sum(r.shape[1] - p["input_ids"].shape[1] for r, p in zip(refs, prompts))
    rows.append(dict(method="model.generate (greedy)", tau=None, time=base, tokens=n_tokens, same=True))

    pl_t, same = 0.0, True
    for p, ref in zip(prompts, refs):
        out, t = timed(lambda: model.generate(**p, max_new_tokens=max_new, do_sample=False, prompt_lookup_num_tokens=10), device)
        pl_t += t
        same &= torch.equal(out, ref)
    rows.append(dict(method="HF prompt lookup (10)", tau=None, time=pl_t, tokens=n_tokens, same=same))

    eagle = vispec.EagleDrafter.from_target(model, seed=0)
    tree = TreeConfig(*args.eagle_tree)
    t_all, acc, steps, same = 0.0, 0, 0, True
    for p, ref in zip(prompts, refs):
        out, t = timed(lambda: vispec.generate(model, eagle, **p, max_new_tokens=max_new, tree=tree), device)
        t_all += t
        acc += out.stats.accepted_draft_tokens
        steps += out.stats.row_steps
        same &= torch.equal(out.sequences, ref)
    rows.append(dict(method=f"vispec, untrained EAGLE tree {tuple(args.eagle_tree)}", tau=acc / max(steps, 1),
                     time=t_all, tokens=n_tokens, same=same))

    depth, width = args.oracle_tree
    otree = TreeConfig(total_tokens=depth * width, depth=depth, top_k=width)
    vocab = model.get_input_embeddings().weight.shape[0]
    for a in args.acceptance:
        t_all, acc, steps, same = 0.0, 0, 0, True
        for i, (p, ref) in enumerate(zip(prompts, refs)):
            cont = ref[:, p["input_ids"].shape[1]:]
            drafter = OracleDrafter(cont, vocab, acceptance=a, width=width, seed=i)
            out, t = timed(lambda: vispec.generate(model, drafter, **p, max_new_tokens=max_new, tree=otree), device)
            t_all += t
            acc += out.stats.accepted_draft_tokens
            steps += out.stats.row_steps
            same &= torch.equal(out.sequences, ref)
        rows.append(dict(method=f"vispec, oracle acceptance {a} (depth {depth} x width {width})", tau=acc / max(steps, 1),
                         time=t_all, tokens=n_tokens, same=same, oracle=True))
        if args.compile:  # the same drafts with the tree forward compiled; compilation warmed up first
            mode = "reduce-overhead" if device.type == "cuda" else True
            for i, (p, ref) in enumerate(zip(prompts, refs)):
                cont = ref[:, p["input_ids"].shape[1]:]
                vispec.generate(model, OracleDrafter(cont, vocab, acceptance=a, width=width, seed=i), **p,
                                max_new_tokens=max_new, tree=otree, compile=mode)
            t_all, acc, steps, same = 0.0, 0, 0, True
            for i, (p, ref) in enumerate(zip(prompts, refs)):
                cont = ref[:, p["input_ids"].shape[1]:]
                drafter = OracleDrafter(cont, vocab, acceptance=a, width=width, seed=i)
                out, t = timed(lambda: vispec.generate(model, drafter, **p, max_new_tokens=max_new, tree=otree,
                                                       compile=mode), device)
                t_all += t
                acc += out.stats.accepted_draft_tokens
                steps += out.stats.row_steps
                same &= torch.equal(out.sequences, ref)
            rows.append(dict(method=f"vispec compiled ({mode if mode is not True else 'default'}), oracle acceptance {a}",
                             tau=acc / max(steps, 1), time=t_all, tokens=n_tokens, same=same, oracle=True))
    for r in rows:
        r["tok_s"] = r["tokens"] / r["time"]
        r["speedup"] = base / r["time"]
        r["decode_speedup"] = (base - prefill) / max(r["time"] - prefill, 1e-9)
        r["prefill_share"] = prefill / r["time"]
        r["eff"] = r["speedup"] / (r["tau"] + 1) if r.get("oracle") else None
    del model
    return rows


COMPILED = "+compiled"  # method-name suffix of a drafter run with vispec.generate(compile=True)


def run_demo(args, device):
    """The demo VLM (SmolLM2-135M-Instruct + trained vision tower) on held-out generated scenes.

    ``--images`` scenes (seeds EVAL_SEED + i, seen by no training), each with prompt i mod 6, at
    temperature 0 and 1. Per pair, in this order so that any drift hits every method alike:
    model.generate, HF prompt lookup, vispec with the shipped ViSpec / EAGLE-2 / HiViS drafters.
    Speedup = method tokens/s over model.generate tokens/s, summed over all pairs of the same run.
    At temperature 0 every output must equal model.generate's; at 1 outputs are samples (the
    engine's sampling is proven lossless by the tests) and only speed and tau are compared.
    Also: the demo model's fact accuracy on its T=0 answers, acceptance per draft depth from
    the accepted-length histograms, and tau against tree depth (``--depth-sweep`` pairs, T=0).
    """
    import random

    from vispec.demo import (DEMO_TREE, DRAFTER_KINDS, EVAL_SEED, PROMPTS, build_demo_vlm, drafter_label, drafter_names,
                             drafter_path, prompt)
    from vispec.demo.model import vision_weights_path
    from vispec.demo.scenes import make_scene, score
    from vispec.demo.model import scene_size
    from vispec.drafters import load_drafter

    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    sources = {}  # method -> the drafter's folder
    if args.drafters:  # every drafter each folder holds, EAGLE-2 heads then EAGLE-3 heads
        for i, folder in enumerate(args.drafters):
            wanted = args.only or drafter_names((2, 3))
            found = [k for k in wanted if (folder / k / "config.json").is_file()]
            if not found or (args.only and len(found) < len(wanted)):
                raise SystemExit(f"{folder} holds {'not all' if found else 'none'} of the demo drafters "
                                 f"({', '.join(wanted)})")
            for k in found:  # several folders (training seeds): methods "<kind>@<folder index>"
                sources[k if len(args.drafters) == 1 else f"{k}@{i}"] = folder / k
        names = {key: drafter_label(key.partition("@")[0]) + ("" if "@" not in key else f" [{src.parent.name}]")
                 for key, src in sources.items()}
    else:
        sources = {k: drafter_path(k, args.image_tokens) for k in DRAFTER_KINDS}
        names = {k: drafter_label(k) for k in sources}
    for key, src in sources.items():
        if not (src / "config.json").is_file():
            raise SystemExit(f"{src} holds no drafter; rebuild them with `python -m vispec.demo.build_drafters`")
    tree = TreeConfig(*(args.demo_tree or DEMO_TREE))
    journal = demo_journal(args, sources, tree, device)  # other settings than its journal's: refused before any work
    model, processor = build_demo_vlm(args.vision_weights or vision_weights_path(args.image_tokens),
                                      image_tokens=args.image_tokens)
    model.to(device)
    tok = processor.tokenizer
    drafters = {key: load_drafter(src, model) for key, src in sources.items()}
    if args.compile:  # the same drafters again, their tree forwards under torch.compile
        for k in [k for k in drafters if "@" not in k or k.endswith("@0")]:
            drafters[k + COMPILED] = drafters[k]
            names[k + COMPILED] = names.get(k, drafter_label(k)) + " (compiled)"
    pairs = []
    for i in range(args.images):
        scene = make_scene(random.Random(EVAL_SEED + i), size=scene_size(model))
        q = PROMPTS[i % len(PROMPTS)]
        pairs.append((scene, q, processor(text=[prompt(processor, q)], images=[scene.image], return_tensors="pt").to(device)))
    max_new = args.max_new
    model.generate(**pairs[0][2], max_new_tokens=4, do_sample=False)  # warm-up
    for k, d in drafters.items():
        if k.endswith(COMPILED):  # compilation and the recompiles that make lengths dynamic, before any timing
            for _, _, inp in pairs[:3]:
                vispec.generate(model, d, **inp, max_new_tokens=48, tree=tree, compile=True)
        else:
            vispec.generate(model, d, **pairs[0][2], max_new_tokens=4, tree=tree)

    def unit(key, compute):
        """One resumable unit of the run: its journaled value, or computed now (and journaled). Values go
        through JSON either way, so a resumed run reads exactly what a fresh one computes."""
        if journal is not None and key in journal:
            return journal[key]["value"]
        if deadline is not None and time.time() > deadline:
            raise Stopped(f"--max-minutes {args.max_minutes:g} reached before {key}")
        value = json.loads(json.dumps(compute()))
        if journal is not None:
            journal.add([{"key": key, "value": value}])
        return value

    def pair_unit(temp, i, scene, inp):
        """model.generate, prompt lookup and every drafter on pair i at temp, back to back (same-unit ratios)."""
        sample = temp > 0
        hf = dict(do_sample=sample, **({"temperature": temp, "top_k": 0} if sample else {}))  # vispec samples without top-k
        p = inp["input_ids"].shape[1]
        torch.manual_seed(i)
        ref, t_plain = timed(lambda: model.generate(**inp, max_new_tokens=max_new, **hf), device)
        out = {"methods": {"plain": dict(time=t_plain, tokens=ref.shape[1] - p)}, "facts": None, "row": None}
        if not sample:
            out["facts"] = score(tok.decode(ref[0, p:], skip_special_tokens=True), scene)
        torch.manual_seed(i)
        # HF's prompt lookup copies n-gram continuations from the prompt, image placeholders included (which
        # then fail LLaVA's image/feature count check); its logits processors veto candidates, so suppressing
        # the placeholder (which the model never emits: equality with plain generate is checked) keeps them out.
        o, t = timed(lambda: model.generate(**inp, max_new_tokens=max_new, prompt_lookup_num_tokens=10,
                                            suppress_tokens=[model.config.image_token_id], **hf), device)
        out["methods"]["lookup"] = dict(time=t, tokens=o.shape[1] - p, same=sample or torch.equal(o, ref))
        for k, d in drafters.items():
            o, t = timed(lambda: vispec.generate(model, d, **inp, max_new_tokens=max_new, tree=tree,
                                                 temperature=temp, seed=i, compile=k.endswith(COMPILED)), device)
            out["methods"][k] = dict(time=t, tokens=o.sequences.shape[1] - p, same=sample or torch.equal(o.sequences, ref),
                                     draft_time=o.stats.time_draft, spec_time=o.stats.time_total,
                                     accepted=o.stats.accepted_draft_tokens, steps=o.stats.row_steps,
                                     hist=list(o.stats.accept_len_hist))
        if not sample:
            out["row"] = (ref.shape[1] - p, t_plain, {k: out["methods"][k]["time"] for k in drafters})
        return out

    results = {}
    facts = {q: [0, 0] for q in PROMPTS}  # per prompt: the long-answer suffix asks for more than the vision side was taught
    per_pair = []  # T=0: (plain answer length, plain seconds, {kind: seconds})
    for temp in args.temperatures:
        acc = {m: dict(time=0.0, tokens=0, same=True, accepted=0, steps=0, hist=[], draft_time=0.0, spec_time=0.0)
               for m in ["plain", "lookup", *drafters]}
        for i, (scene, q, inp) in enumerate(tqdm(pairs, desc=f"demo T={temp:g}", file=sys.stderr)):
            u = unit(f"pair/{temp:g}/{i}", lambda: pair_unit(temp, i, scene, inp))
            for m, v in u["methods"].items():
                a = acc[m]
                for f in ("time", "tokens", "accepted", "steps", "draft_time", "spec_time"):
                    a[f] += v.get(f, 0)
                a["same"] &= v.get("same", True)
                a["hist"] = [x + y for x, y in zip_longest(a["hist"], v.get("hist", []), fillvalue=0)]
            if u["facts"] is not None:
                for j in (0, 1):
                    facts[q][j] += u["facts"][j]
            if u["row"] is not None:
                per_pair.append(u["row"])
        base = acc["plain"]["tokens"] / acc["plain"]["time"]
        for m, a in acc.items():
            a["tok_s"] = a["tokens"] / a["time"]
            a["speedup"] = a["tok_s"] / base
            a["tau"] = a["accepted"] / a["steps"] if a["steps"] else None
        results[temp] = acc
    # The drafter's prefill length against the target's input (HiViS reports 0.7-1.3%): a prefill-only call.
    def prefill_unit(d):
        fr = []
        for scene, q, inp in pairs[: args.prefill_pairs]:
            vispec.generate(model, d, **inp, max_new_tokens=1, tree=tree)  # prefill + first token: no extend
            fr.append(float(d.state.lens[0]) / inp["input_ids"].shape[1])
        return sum(fr) / max(len(fr), 1)

    prefill_frac = {k: unit(f"prefill/{k}", lambda: prefill_unit(d))  # (0 pairs: not measured, not reported)
                    for k, d in (drafters.items() if args.prefill_pairs else ()) if not k.endswith(COMPILED)}
    # The secondary measurements (batches, text-only prompts, depth sweep) run on the first folder's drafters.
    first = {k: d for k, d in drafters.items() if ("@" not in k or k.endswith("@0")) and not k.endswith(COMPILED)}
    batched = {bsz: unit(f"batch/{bsz}", lambda: run_demo_batch(model, processor, first, pairs, args, device, tree, bsz))
               for bsz in args.batches}
    text_only = unit("text_only", lambda: run_demo_text_only(model, processor, first, args, device, tree)) \
        if args.text_only else {}

    def sweep_unit(d):
        taus = []
        for depth in range(1, args.max_depth + 1):
            pool = tree.top_k + (depth - 1) * tree.top_k ** 2
            t = TreeConfig(min(tree.total_tokens, pool), depth, tree.top_k)
            a = s_ = 0
            for scene, q, inp in pairs[: args.depth_sweep]:
                out = vispec.generate(model, d, **inp, max_new_tokens=max_new, tree=t)
                a += out.stats.accepted_draft_tokens
                s_ += out.stats.row_steps
            taus.append(a / max(s_, 1))
        return taus

    sweep = {k: unit(f"depth_sweep/{k}", lambda: sweep_unit(d)) for k, d in first.items()} if args.depth_sweep else {}

    def tree_sweep_unit():
        """Speedup and tau per tree shape (T=0): per pair, model.generate, then every drafter with every tree in
        turn, so the shapes' ratios share the pair and the machine's drift."""
        trees = {tuple(t): TreeConfig(*t) for t in args.sweep_trees}  # the journal's key of a shape: "<kind>/[T, D, K]"
        acc = {"plain": [0.0, 0]} | {f"{k}/{list(t)}": [0.0, 0, 0, 0, True] for k in first for t in trees}
        for scene, q, inp in pairs[: args.tree_sweep]:
            p = inp["input_ids"].shape[1]
            ref, t_plain = timed(lambda: model.generate(**inp, max_new_tokens=max_new, do_sample=False), device)
            acc["plain"][0] += t_plain
            acc["plain"][1] += ref.shape[1] - p
            for k, d in first.items():
                for shape, t in trees.items():
                    o, dt = timed(lambda: vispec.generate(model, d, **inp, max_new_tokens=max_new, tree=t), device)
                    a = acc[f"{k}/{list(shape)}"]
                    a[0] += dt
                    a[1] += o.sequences.shape[1] - p
                    a[2] += o.stats.accepted_draft_tokens
                    a[3] += o.stats.row_steps
                    a[4] &= torch.equal(o.sequences, ref)
        return acc

    tree_sweep = unit("tree_sweep", tree_sweep_unit) if args.tree_sweep else {}
    return dict(results=results, sweep=sweep, facts=facts, tree=tree, names=names, n_pairs=len(pairs),
                n_prompts=len(PROMPTS), per_pair=per_pair, prefill_frac=prefill_frac, batched=batched,
                text_only=text_only, tree_sweep=tree_sweep, image_tokens=args.image_tokens)


class Stopped(Exception):
    """A demo run stopped at --max-minutes; its journal holds what it finished (exit status 3: resumable)."""


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def demo_journal(args, sources, tree, device):
    """The --journal of a demo run, under everything its units depend on: the model's vision weights, every
    drafter's files (by content), the tree, the prompts and the measurement settings."""
    if args.journal is None:
        return None
    from vispec.demo.model import vision_weights_path
    from vispec.journal import Journal

    files = {k: {f.name: file_digest(f) for f in sorted(src.glob("*")) if f.is_file()} for k, src in sources.items()}
    config = dict(image_tokens=args.image_tokens, device=str(device), max_new=args.max_new, images=args.images,
                  compile=args.compile,
                  vision=file_digest(args.vision_weights or vision_weights_path(args.image_tokens)),
                  drafters=files, tree=list(vars(tree).values()), prefill_pairs=args.prefill_pairs,
                  batch_groups=args.batch_groups, text_only=args.text_only, depth_sweep=args.depth_sweep,
                  **({"tree_sweep": args.tree_sweep, "sweep_trees": args.sweep_trees} if args.tree_sweep else {}),
                  max_depth=args.max_depth)
    return Journal(args.journal, config)


def run_demo_batch(model, processor, drafters, pairs, args, device, tree, bsz):
    """Throughput at batch size ``bsz`` (greedy): consecutive pairs padded into one batch, vispec against
    batched model.generate on the same batch; outputs must be identical."""
    from vispec.demo import prompt

    tok = processor.tokenizer
    tok.padding_side = "left"
    groups = [pairs[i : i + bsz] for i in range(0, len(pairs) - bsz + 1, bsz)][: args.batch_groups]
    acc = {m: dict(time=0.0, tokens=0, same=True) for m in ["plain", *drafters]}
    for g in groups:
        inp = processor(text=[prompt(processor, q) for _, q, _ in g], images=[s.image for s, _, _ in g],
                        return_tensors="pt", padding=True).to(device)
        p = inp["input_ids"].shape[1]
        ref, t = timed(lambda: model.generate(**inp, max_new_tokens=args.max_new, do_sample=False), device)
        pad = model.generation_config.pad_token_id
        acc["plain"]["time"] += t
        acc["plain"]["tokens"] += int((ref[:, p:] != pad).sum())
        for k, d in drafters.items():
            o, t = timed(lambda: vispec.generate(model, d, **inp, max_new_tokens=args.max_new, tree=tree), device)
            acc[k]["time"] += t
            acc[k]["tokens"] += int((o.sequences[:, p:] != pad).sum())
            acc[k]["same"] &= torch.equal(o.sequences, ref)
    base = acc["plain"]["tokens"] / max(acc["plain"]["time"], 1e-9)
    return {m: dict(tok_s=a["tokens"] / max(a["time"], 1e-9), speedup=a["tokens"] / max(a["time"], 1e-9) / base,
                    same=a["same"]) for m, a in acc.items()}


TEXT_PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
                "Give three tips for learning a new language.", "What is the capital of France, and why is it famous?",
                "Describe a sunny day at the beach.", "List five fruits and their colours.")


def run_demo_text_only(model, processor, drafters, args, device, tree):
    """Text-only prompts through the VLM (greedy): speedup and tau of each drafter, outputs identical."""
    tok = processor.tokenizer
    acc = {m: dict(time=0.0, tokens=0, same=True, accepted=0, steps=0) for m in ["plain", *drafters]}
    for i in range(args.text_only):
        text = tok.apply_chat_template([{"role": "user", "content": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}],
                                       add_generation_prompt=True, tokenize=False)
        inp = tok([text], return_tensors="pt").to(device)
        inp.pop("token_type_ids", None)
        p = inp["input_ids"].shape[1]
        ref, t = timed(lambda: model.generate(**inp, max_new_tokens=args.max_new, do_sample=False), device)
        acc["plain"]["time"] += t
        acc["plain"]["tokens"] += ref.shape[1] - p
        for k, d in drafters.items():
            o, t = timed(lambda: vispec.generate(model, d, **inp, max_new_tokens=args.max_new, tree=tree), device)
            a = acc[k]
            a["time"] += t
            a["tokens"] += o.sequences.shape[1] - p
            a["same"] &= torch.equal(o.sequences, ref)
            a["accepted"] += o.stats.accepted_draft_tokens
            a["steps"] += o.stats.row_steps
    base = acc["plain"]["tokens"] / max(acc["plain"]["time"], 1e-9)
    return {m: dict(speedup=a["tokens"] / max(a["time"], 1e-9) / base, same=a["same"],
                    tau=a["accepted"] / a["steps"] if a["steps"] else None) for m, a in acc.items()}


def write_demo(res, args, label):
    names = {"plain": "model.generate", "lookup": "HF prompt lookup (10)", **res["names"]}
    tree = res["tree"]
    g, n = (sum(f[j] for f in res["facts"].values()) for j in (0, 1))
    per_prompt = "; ".join(f"\"{q}\" {f[0] / f[1]:.0%} ({f[0]}/{f[1]})" for q, f in res["facts"].items() if f[1])
    drafters = ", ".join(f"`{d}`" for d in args.drafters) if args.drafters else "the package's"
    lines = [
        f"# vispec end-to-end, suite `demo` on {label}",
        "",
        f"torch {torch.__version__}, float32, batch 1. Target: the demo VLM (SmolLM2-135M-Instruct, real weights, "
        f"+ trained 4-layer ViT and projector). {res['n_pairs']} held-out generated scenes (seeds 10^7 + i, seen by "
        f"neither the vision training nor the drafters' data), each with one of {res['n_prompts']} prompts in turn; up to "
        f"{args.max_new} new "
        f"tokens. Drafters: {drafters}, trained by `python -m "
        f"vispec.demo.build_drafters` on the same data; tree (total, depth, top-k) = {tuple(vars(tree).values())}.",
        "",
        "tau = accepted draft tokens per target forward (bonus excluded; EAGLE's 'acceptance length' is tau + 1). "
        "Speedup = tokens/s over model.generate's, same run, methods interleaved per prompt.",
        "",
        (f"Demo model fact accuracy on its greedy answers: **{g / n:.1%}** ({g} of {n} facts); per prompt: "
         f"{per_prompt}." if n else "Demo model fact accuracy: not measured (no temperature-0 run, or no fact in "
         "its answers)."),
        "",
    ]
    for temp, acc in res["results"].items():
        lines += [f"## temperature {temp:g}", "", "| method | tau | acceptance length | tokens/s | speedup | "
                  + ("identical to generate |" if temp == 0 else "output |"), "|---|---|---|---|---|---|"]
        for m, a in acc.items():
            tau = "-" if a["tau"] is None else f"{a['tau']:.2f}"
            al = "-" if a["tau"] is None else f"{a['tau'] + 1:.2f}"
            same = ("yes" if a["same"] else "NO") if temp == 0 else "sampled"
            lines.append(f"| {names[m]} | {tau} | {al} | {a['tok_s']:.1f} | {a['speedup']:.2f}x | {same} |")
        lines.append("")
        lines += ["Acceptance per draft depth (fraction of verification steps that accepted at least d drafts):", "",
                  "| drafter | " + " | ".join(f"d={d}" for d in range(1, tree.depth + 1)) + " |",
                  "|---|" + "---|" * tree.depth]
        for m, a in acc.items():
            if a["hist"]:
                tot = sum(a["hist"])
                reach = [sum(a["hist"][d:]) / tot for d in range(1, tree.depth + 1)]
                lines.append(f"| {names[m]} | " + " | ".join(f"{r:.2f}" for r in reach) + " |")
        lines.append("")
    frac = res["prefill_frac"]
    if frac:
        lines += [f"Drafter prefill length as a fraction of the target's input ({args.prefill_pairs} prompts, "
                  f"{res['image_tokens']} image tokens per image): "
                  + ", ".join(f"{res['names'][k]} {100 * f:.1f}%" for k, f in frac.items()) + ".", ""]
    acc0 = res["results"].get(0.0)
    if acc0:
        lines += ["Drafting time share of vispec's time (T=0): "
                  + ", ".join(f"{res['names'][k]} {100 * a['draft_time'] / max(a['spec_time'], 1e-9):.0f}%"
                              for k, a in acc0.items() if a["spec_time"]) + ".", ""]
    if res["per_pair"]:
        rows = sorted(res["per_pair"], key=lambda r: r[0])
        q = max(1, len(rows) // 4)
        bins = [rows[i : i + q] for i in range(0, len(rows), q)]
        kinds = list(rows[0][2])
        lines += ["## speedup against answer length (temperature 0, answers binned by length)", "",
                  "| answer tokens | " + " | ".join(res["names"][k] for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
        for b in bins:
            toks = sum(r[0] for r in b)
            cells = [f"{sum(r[1] for r in b) / max(sum(r[2][k] for r in b), 1e-9):.2f}x" for k in kinds]
            lines.append(f"| {b[0][0]}-{b[-1][0]} (mean {toks / len(b):.0f}) | " + " | ".join(cells) + " |")
        lines.append("")
    if res["batched"]:
        kinds = [m for m in next(iter(res["batched"].values())) if m != "plain"]
        lines += [f"## throughput against batch size (temperature 0, {args.batch_groups} batches each, against "
                  "batched model.generate on the same batch)", "",
                  "| batch | model.generate tokens/s | " + " | ".join(res["names"][k] for k in kinds) + " | identical |",
                  "|---|---|" + "---|" * len(kinds) + "---|"]
        for bsz, acc in res["batched"].items():
            same = all(acc[k]["same"] for k in kinds)
            lines.append(f"| {bsz} | {acc['plain']['tok_s']:.1f} | "
                         + " | ".join(f"{acc[k]['speedup']:.2f}x" for k in kinds) + f" | {'yes' if same else 'NO'} |")
        lines.append("")
    if res["text_only"]:
        kinds = [m for m in res["text_only"] if m != "plain"]
        lines += [f"## text-only prompts ({args.text_only}, temperature 0)", "", "| drafter | tau | speedup | identical |",
                  "|---|---|---|---|"]
        for k in kinds:
            a = res["text_only"][k]
            lines.append(f"| {res['names'][k]} | {a['tau']:.2f} | {a['speedup']:.2f}x | {'yes' if a['same'] else 'NO'} |")
        lines.append("")
    if res["sweep"]:
        depths = len(next(iter(res["sweep"].values())))
        lines += [f"## average acceptance length (tau + 1) against draft depth, temperature 0, first "
                  f"{args.depth_sweep} prompts, top-k {tree.top_k}, total tokens min({tree.total_tokens}, pool)", "",
                  "| drafter | " + " | ".join(f"depth {d}" for d in range(1, depths + 1)) + " |", "|---|" + "---|" * depths]
        for k, taus in res["sweep"].items():
            lines.append(f"| {names[k]} | " + " | ".join(f"{t + 1:.2f}" for t in taus) + " |")
        lines.append("")
    if res.get("tree_sweep"):
        ts = res["tree_sweep"]
        base = ts["plain"][1] / ts["plain"][0]
        lines += [f"## speedup against tree shape (temperature 0, first {args.tree_sweep} pairs, every shape run in turn "
                  "on each pair)", "", "| drafter | tree (total, depth, top-k) | tau | speedup | identical |",
                  "|---|---|---|---|---|"]
        for key, (t, n, a, st, same) in ((k, v) for k, v in ts.items() if k != "plain"):
            kind, _, shape = key.partition("/")
            lines.append(f"| {names[kind]} | ({shape.strip('[]')}) | {a / max(st, 1):.2f} | {n / t / base:.2f}x | "
                         f"{'yes' if same else 'NO'} |")
        lines.append("")
    return lines, names


def plot_demo(res, names, path, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(res["results"])
    methods = [m for m in res["results"][temps[0]] if m != "plain"]
    fig, axes = plt.subplots(1, 3 if res["sweep"] else 2, figsize=(13 if res["sweep"] else 9, 3.8))
    w = 0.8 / len(temps)
    for j, temp in enumerate(temps):
        acc = res["results"][temp]
        xs = [i + j * w for i in range(len(methods))]
        axes[0].bar(xs, [acc[m]["speedup"] for m in methods], w, label=f"T={temp:g}")
        axes[1].bar(xs, [acc[m]["tau"] or 0 for m in methods], w, label=f"T={temp:g}")
    for ax, title in zip(axes[:2], ["speedup over model.generate", "tau (accepted drafts per forward)"]):
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(methods))], [names[m] for m in methods], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    if res["sweep"]:
        for k, taus in res["sweep"].items():
            axes[2].plot(range(1, len(taus) + 1), [t + 1 for t in taus], "o-", label=names[k])
        axes[2].set_xlabel("draft depth")
        axes[2].set_title("acceptance length (tau + 1), T=0", fontsize=9)
        axes[2].legend(fontsize=7)
    fig.suptitle(f"vispec on the demo VLM ({label})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from vispec.demo import DEFAULT_IMAGE_TOKENS, drafter_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["medium", "7b", "demo"], default="medium")
    ap.add_argument("--images", type=int, default=100, help="demo suite: held-out scenes (one prompt each)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="demo suite")
    ap.add_argument("--demo-tree", type=int, nargs=3, default=None, metavar=("TOTAL", "DEPTH", "TOPK"))
    ap.add_argument("--depth-sweep", type=int, default=16, help="demo suite: prompts in the depth sweep (0: none)")
    ap.add_argument("--tree-sweep", type=int, default=0, help="demo suite: pairs timing every --sweep-trees shape (T=0)")
    ap.add_argument("--sweep-trees", type=lambda v: tuple(int(x) for x in v.split(",")), nargs="+",
                    default=[(12, 5, 4), (8, 4, 3), (6, 4, 2), (5, 5, 1)], metavar="TOTAL,DEPTH,TOPK",
                    help="demo suite: the tree shapes of --tree-sweep")
    ap.add_argument("--image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS,
                    help="demo suite: the demo VLM's image tokens per image")
    ap.add_argument("--vision-weights", type=Path, default=None, help="demo suite: default the package's for --image-tokens")
    ap.add_argument("--drafters", type=Path, nargs="+", default=None,
                    help="demo suite: folder(s) of <kind>/ drafters (default: the shipped ones); several folders "
                         "(e.g. training seeds) run in one benchmark, model.generate and prompt lookup timed once")
    ap.add_argument("--only", nargs="+", default=None, choices=drafter_names((2, 3)),
                    help="demo suite: the drafters (folder names) taken from each --drafters folder (default: all found)")
    ap.add_argument("--prefill-pairs", type=int, default=10, help="demo suite: prompts measuring drafter prefill length")
    ap.add_argument("--batches", type=int, nargs="*", default=[], help="demo suite: batch sizes for throughput (e.g. 1 4 8)")
    ap.add_argument("--batch-groups", type=int, default=4, help="demo suite: batches per batch size")
    ap.add_argument("--text-only", type=int, default=0, help="demo suite: text-only prompts")
    ap.add_argument("--compile", action="store_true",
                    help="also run the tree forward under torch.compile: each demo drafter again, or each oracle row "
                         "(reduce-overhead, i.e. CUDA graphs, on a GPU) - eager vs compiled")
    ap.add_argument("--out", type=Path, default=None, help="the result markdown (default: e2e-<suite>-<device>.md in the results folder)")
    ap.add_argument("--json", type=Path, default=None, help="demo suite: also write tau / speedup per method as JSON")
    ap.add_argument("--journal", type=Path, default=None,
                    help="demo suite: JSON lines of every finished unit (a prompt at a temperature with all methods, a "
                         "batch size, ...); a re-run with the same settings resumes from it")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="demo suite, with --journal: > 0 stops before a unit once this much time has passed (exit 3)")
    ap.add_argument("--max-depth", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=None, help="new tokens per prompt (default 96; demo suite 160)")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 32 new tokens")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--acceptance", type=float, nargs="*", default=[1.0, 0.8, 0.5, 0.0])
    ap.add_argument("--eagle-tree", type=int, nargs=3, default=None, metavar=("TOTAL", "DEPTH", "TOPK"))
    ap.add_argument("--oracle-tree", type=int, nargs=2, default=None, metavar=("DEPTH", "WIDTH"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.suite == "7b" and device.type != "cuda":
        sys.exit("the 7b suite needs a GPU (about 15 GB per model in bf16)")
    if args.max_new is None:
        args.max_new = 160 if args.suite == "demo" else 96
    if args.quick:
        args.prompts, args.max_new, args.images, args.depth_sweep = 2, 32, 2, 2
        args.tree_sweep = min(args.tree_sweep, 2)
    if min(args.images, args.prompts, args.max_new, args.max_depth) < 1 or min(args.depth_sweep, args.tree_sweep) < 0:
        ap.error("--images, --prompts, --max-new, --max-depth must be >= 1, --depth-sweep and --tree-sweep >= 0")
    for t in args.sweep_trees:
        if len(t) != 3:
            ap.error(f"--sweep-trees: {','.join(map(str, t))} is not TOTAL,DEPTH,TOPK")
        try:
            TreeConfig(*t)
        except ValueError as e:
            ap.error(f"--sweep-trees {','.join(map(str, t))}: {e}")
    if args.suite == "demo" and args.dtype:
        ap.error("--dtype: the demo suite runs the demo VLM in float32, as `vispec demo` does")
    if any(t < 0 for t in args.temperatures):
        ap.error("--temperatures must be >= 0")
    if args.max_minutes < 0 or (args.max_minutes and not args.journal):
        ap.error("--max-minutes must be >= 0, and needs --journal (a stopped run resumes from it)")
    if args.journal and args.suite != "demo":
        ap.error("--journal: only the demo suite runs in resumable units")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # A CPU verifies a big tree slowly (it is compute-bound), so CPU runs use small trees.
    if args.eagle_tree is None:
        args.eagle_tree = [30, 3, 8] if device.type == "cuda" else [8, 3, 3]
    if args.oracle_tree is None:
        args.oracle_tree = [5, 3] if device.type == "cuda" else [4, 2]
    torch.manual_seed(0)
    label = device_label(device)
    lines = [
        f"# vispec end-to-end, suite `{args.suite}` on {label}",
        "",
        f"torch {torch.__version__}, {dtype}, {args.prompts} prompts x {args.max_new} new tokens, batch 1, greedy; "
        "random-weight models (output quality is meaningless, speed and equality are not). "
        "tau = accepted draft tokens per target forward (bonus excluded); efficiency = speedup / (tau + 1).",
        "",
    ]
    if args.suite == "demo":
        try:
            res = run_demo(args, device)
        except Stopped as e:
            print(f"stopped: {e}; {args.journal} holds the finished units, re-run to continue", flush=True)
            sys.exit(3)
        lines, names = write_demo(res, args, label)
        print("\n".join(lines), flush=True)
        name = "e2e-demo" + ("" if args.image_tokens == 36 else f"-{args.image_tokens}") + ("-quick" if args.quick else "")
        out = args.out or results_dir() / f"{name}-{label}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        png = out.with_suffix(".png")
        plot_demo(res, names, png, label)
        lines.append(f"![speedup and tau per method]({png.name})")
        out.write_text("\n".join(lines) + "\n")
        if args.json:
            import json

            summary = {f"{t:g}": {m: {"tau": a["tau"], "speedup": a["speedup"], "same": a["same"]} for m, a in acc.items()}
                       for t, acc in res["results"].items()}
            args.json.write_text(json.dumps({"image_tokens": args.image_tokens, "results": summary,
                                             "prefill_frac": res["prefill_frac"], "facts": res["facts"]}, indent=1))
        print(f"wrote {out} and {png}")
        same = [a["same"] for a in res["results"].get(0.0, {}).values()]
        same += [a["same"] for acc in res["batched"].values() for a in acc.values()]
        same += [a["same"] for a in res["text_only"].values()]
        if not all(same):
            sys.exit("a speculative output differed from model.generate at temperature 0")
        return
    all_rows = {}
    for name in tqdm(args.models, desc="models", file=sys.stderr):
        rows = run_model(name, args, device, dtype)
        all_rows[name] = rows
        lines += [f"## {name}", "", "| method | tau | tokens/s | speedup | efficiency | decode-only speedup | "
                  "prefill share | identical to generate |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
            eff = "-" if r["eff"] is None else f"{r['eff']:.2f}"
            same = "yes" if r["same"] else "NO"
            lines.append(f"| {r['method']} | {tau} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {eff} | "
                         f"{r['decode_speedup']:.2f}x | {100 * r['prefill_share']:.0f}% | {same} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4 :]), flush=True)
    out = args.out or results_dir() / f"e2e-{args.suite}-{label}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(all_rows, png, label)
    lines.append(f"![speedup against tau]({png.name})")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {png}")
    if not all(r["same"] for rows in all_rows.values() for r in rows):
        sys.exit("a speculative output differed from model.generate")


def plot(all_rows, path, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in all_rows.items():
        pts = sorted((r["tau"], r["speedup"]) for r in rows if r.get("oracle"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name}: oracle drafter")
        eagle = [r for r in rows if r["method"].startswith("vispec, untrained")]
        ax.plot([r["tau"] for r in eagle], [r["speedup"] for r in eagle], "x", ms=9, label=f"{name}: untrained EAGLE")
    taus = [r["tau"] for rows in all_rows.values() for r in rows if r["tau"] is not None]
    top = max(taus + [1.0])
    ax.plot([0, top], [1, top + 1], "k:", lw=1, label="ideal: speedup = tau + 1")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("tau (accepted draft tokens per target forward)")
    ax.set_ylabel("speedup over model.generate")
    ax.set_title(f"vispec end-to-end on {label}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
