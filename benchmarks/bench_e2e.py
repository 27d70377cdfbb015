"""End-to-end speed of vispec against model.generate and HF prompt-lookup decoding.

    python benchmarks/bench_e2e.py                   # medium random-weight LLaVA and Qwen2.5-VL (CPU-sized)
    python benchmarks/bench_e2e.py --suite 7b        # real-size LLaVA-1.6-7B / Qwen2.5-VL-7B shapes (GPU)
    python benchmarks/bench_e2e.py --quick           # fewer prompts and tokens

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
benchmarks/results/e2e-<suite>-<device>.md and a PNG of speedup against tau.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import vispec
from vispec.drafters import OracleDrafter, TreeConfig

ROOT = Path(__file__).resolve().parent
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
    for r in rows:
        r["tok_s"] = r["tokens"] / r["time"]
        r["speedup"] = base / r["time"]
        r["decode_speedup"] = (base - prefill) / max(r["time"] - prefill, 1e-9)
        r["prefill_share"] = prefill / r["time"]
        r["eff"] = r["speedup"] / (r["tau"] + 1) if r.get("oracle") else None
    del model
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["medium", "7b"], default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="2 prompts, 32 new tokens")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--acceptance", type=float, nargs="*", default=[1.0, 0.8, 0.5, 0.0])
    ap.add_argument("--eagle-tree", type=int, nargs=3, default=None, metavar=("TOTAL", "DEPTH", "TOPK"))
    ap.add_argument("--oracle-tree", type=int, nargs=2, default=None, metavar=("DEPTH", "WIDTH"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.suite == "7b" and device.type != "cuda":
        sys.exit("the 7b suite needs a GPU (about 15 GB per model in bf16)")
    if args.quick:
        args.prompts, args.max_new = 2, 32
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # A CPU verifies a big tree slowly (it is compute-bound), so CPU runs use small trees.
    if args.eagle_tree is None:
        args.eagle_tree = [30, 3, 8] if device.type == "cuda" else [8, 3, 3]
    if args.oracle_tree is None:
        args.oracle_tree = [5, 3] if device.type == "cuda" else [4, 2]
    torch.manual_seed(0)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    label = "".join(c if c.isalnum() or c in "._-" else "-" for c in label)
    lines = [
        f"# vispec end-to-end, suite `{args.suite}` on {label}",
        "",
        f"torch {torch.__version__}, {dtype}, {args.prompts} prompts x {args.max_new} new tokens, batch 1, greedy; "
        "random-weight models (output quality is meaningless, speed and equality are not). "
        "tau = accepted draft tokens per target forward (bonus excluded); efficiency = speedup / (tau + 1).",
        "",
    ]
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
    out = ROOT / "results" / f"e2e-{args.suite}-{label}.md"
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
