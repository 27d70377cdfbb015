"""ViSpec and HiViS drafters: sequence construction, losslessness, checkpoints (official layouts too)."""
import json

import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import PrefillInputs, TreeConfig, load_drafter

VLMS = {
    "llava": (T.llava, T.llava_inputs),
    "llava_next": (T.llava_next, T.llava_next_inputs),
    "qwen2_vl": (T.qwen2_vl, T.qwen_inputs),
    "qwen2_5_vl": (T.qwen2_5_vl, T.qwen_inputs),
    "qwen3_vl": (T.qwen3_vl, T.qwen_inputs),
    "llava_onevision": (T.llava_onevision, T.llava_onevision_inputs),  # images and videos in one batch
    "idefics3": (T.idefics3, T.idefics3_inputs),
    "gemma3": (T.gemma3, T.gemma3_inputs),
    "smolvlm": (T.smolvlm, T.idefics3_inputs),
}
KINDS = [vispec.EagleDrafter, vispec.ViSpecDrafter, vispec.HiViSDrafter]


@pytest.fixture(scope="module", params=list(VLMS))
def vlm(request):
    build, make = VLMS[request.param]
    return request.param, build(), make


@pytest.mark.parametrize("gen", [2, 3], ids=["eagle2-head", "eagle3-head"])
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.drafter_type())
def test_greedy_lossless_every_drafter(vlm, cls, gen):
    """Every kind on both heads (HiViS with its step residuals) on every family."""
    name, model, make = vlm
    inputs = make([5, 9, 2], seed=21)
    ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    extra = {"hivis_residuals": 2} if cls is vispec.HiViSDrafter else {}
    d = cls.from_target(model, seed=1, generation=gen, **extra)
    out = vispec.generate(model, d, **inputs, max_new_tokens=16, tree=TreeConfig(10, 3, 4))
    assert torch.equal(out.sequences, ref)


def two_image_prefill(model, n_img_tokens, image_token, lengths=(20, 31)):
    """PrefillInputs by hand: row 0 holds two images, row 1 one image, then text."""
    h = model.config.get_text_config().hidden_size
    b, p = 2, max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (b, p), generator=g)
    ids[0, 2 : 2 + n_img_tokens] = image_token
    ids[0, 4 + n_img_tokens : 4 + 2 * n_img_tokens] = image_token
    ids[1, 0:n_img_tokens] = image_token  # an image at the very start
    return PrefillInputs(
        input_ids=ids,
        inputs_embeds=torch.randn(b, p, h, generator=g),
        features=torch.randn(b, p, h, generator=g),
        lengths=torch.tensor(lengths),
        next_tokens=torch.tensor([7, 8]),
        image_mask=ids == image_token,
    )


@pytest.mark.parametrize("num_q", [1, 2, 4])
def test_prefill_lengths(num_q):
    model = T.llava()
    n = 6
    inputs = two_image_prefill(model, n, T.IMAGE_TOKEN)
    lens = {}
    for cls in KINDS:
        d = cls.from_target(model, seed=0, num_q=num_q)
        d.begin(2, 64, torch.device("cpu"))
        d.prefill(inputs)
        lens[cls.drafter_type()] = d.state.lens.tolist()
        assert d.state.next_pos.tolist() == [20, 31]  # decoding continues over the uncompressed length
    # ViSpec: each image shrinks by (image tokens - num_q + 1) ...
    assert [e - v for e, v in zip(lens["eagle"], lens["vispec"])] == [2 * (n - num_q + 1), (n - 1) - min(num_q - 1, n - 1) + 0]
    # ... HiViS keeps the text only.
    assert lens["hivis"] == [20 - 2 * n, 31 - n]


def test_vispec_sequence_construction():
    model = T.llava()
    n = 6
    inputs = two_image_prefill(model, n, T.IMAGE_TOKEN)
    d = vispec.ViSpecDrafter.from_target(model, seed=0, num_q=3)
    d.begin(2, 64, torch.device("cpu"))
    x, pos, count = d.prefill_sequence(inputs)
    row = pos[0, : count[0]].tolist()
    # Image 1 tokens 2..7 -> drafter positions 1..6 dropped, compressed at 5, 6; image 2 tokens 10..15 -> 9..14, at 13, 14.
    assert row == [0, 5, 6, 7, 8, 13, 14] + list(range(15, 20))
    comp = d.imadpt(inputs.inputs_embeds[0, 2:8])
    assert torch.allclose(x[0, 1], comp[0]) and torch.allclose(x[0, 2], comp[1])  # raw, bypassing fc
    # Text after image 2 sees image 2's global feature; text between images, image 1's.
    g2 = d.imadpt(inputs.inputs_embeds[0, 10:16])[-1]
    emb = d.shifted_embeds(inputs)
    want = d.fuse(emb[0:1, 15:16], inputs.features[0:1, 15:16], glob=g2.view(1, 1, -1))
    assert torch.allclose(x[0, 7], want[0, 0], atol=1e-6)
    assert torch.equal(d.state.glob[0], g2.detach()) or torch.allclose(d.state.glob[0], g2)


def test_hivis_prefill_holds_no_image_position():
    model = T.llava()
    inputs = two_image_prefill(model, 6, T.IMAGE_TOKEN)
    d = vispec.HiViSDrafter.from_target(model)
    d.begin(2, 64, torch.device("cpu"))
    x, pos, count = d.prefill_sequence(inputs)
    for r in range(2):
        kept = pos[r, : count[r]]
        assert not inputs.image_mask[r, kept].any()
        assert count[r] == int((~inputs.image_mask[r, : inputs.lengths[r]]).sum())


def test_img_fc_starts_as_identity():
    model = T.llava()
    d = vispec.ViSpecDrafter.from_target(model, seed=0)
    f, g = torch.randn(3, 64), torch.randn(3, 64)
    assert torch.allclose(d.img_fc(torch.cat([f, g], -1)), f, atol=1e-6)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.drafter_type())
def test_checkpoint_round_trip(tmp_path, cls):
    model = T.qwen2_vl()
    d = cls.from_target(model, seed=3)
    d.save_pretrained(tmp_path)
    back = load_drafter(tmp_path, model)
    assert type(back) is cls
    assert d.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("cls,extra", [(vispec.EagleDrafter, {}), (vispec.ViSpecDrafter, {"qkv_bias": True})])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_checkpoint_layout(tmp_path, cls, extra, fmt):
    """State dicts named as EAGLE-2 / ViSpec releases name them load into our drafters."""
    model = T.llava()
    tc = model.config.get_text_config()
    h, heads, kv, inter, v = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size, tc.vocab_size
    hd = h // heads
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = {
        "embed_tokens.weight": rnd(v, h),  # shipped in the releases, ignored
        "fc.weight": rnd(h, 2 * h), "fc.bias": rnd(h),
        "layers.0.self_attn.q_proj.weight": rnd(heads * hd, h),
        "layers.0.self_attn.k_proj.weight": rnd(kv * hd, h),
        "layers.0.self_attn.v_proj.weight": rnd(kv * hd, h),
        "layers.0.self_attn.o_proj.weight": rnd(h, heads * hd),
        "layers.0.mlp.gate_proj.weight": rnd(inter, h),
        "layers.0.mlp.up_proj.weight": rnd(inter, h),
        "layers.0.mlp.down_proj.weight": rnd(h, inter),
        "layers.0.post_attention_layernorm.weight": rnd(h),
    }
    if extra.get("qkv_bias"):
        state.update({f"layers.0.self_attn.{p}_proj.bias": rnd(n * hd) for p, n in (("q", heads), ("k", kv), ("v", kv))})
    if cls is vispec.ViSpecDrafter:
        state.update({
            "imadpt.q": rnd(2, heads, hd),
            "imadpt.k_proj.weight": rnd(heads * hd, h), "imadpt.k_proj.bias": rnd(heads * hd),
            "imadpt.v_proj.weight": rnd(heads * hd, h), "imadpt.v_proj.bias": rnd(heads * hd),
            "imadpt.o_proj.weight": rnd(h, heads * hd),
            "img_fc.weight": rnd(h, 2 * h), "img_fc.bias": rnd(h),
        })
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
              "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": v, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "num_hidden_layers": 1, "bias": True, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "model.safetensors"))
    d = cls.from_official(tmp_path, model)
    own = d.state_dict()
    for k, t in state.items():
        if k.startswith("embed_tokens"):
            continue
        assert torch.equal(own[k], t), k
    inputs = T.llava_inputs([5], seed=1)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10).sequences, ref)
    # A checkpoint of the other kind is refused with the keys named.
    state.pop("fc.bias")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="missing \\['fc.bias'\\]"):
        cls.from_official(tmp_path, model)


def qwen_video_inputs(rows=1):
    g = torch.Generator().manual_seed(0)
    grid = (2, 4, 6)  # 2 frames (after temporal patching) of 4 x 6 patches: 6 tokens per frame after the 2x2 merge
    n_tok = 2 * 4 * 6 // 4
    seqs = []
    for r in range(rows):
        seqs.append(torch.cat([torch.tensor([5 + r, 9, T.VISION_START]), torch.full((n_tok,), T.VIDEO_TOKEN),
                               torch.tensor([11, 12, 13][: 3 - r])]))
    inp = T.pad_rows(seqs, "left")
    ids = inp["input_ids"]
    return inp | {"mm_token_type_ids": (ids == T.VIDEO_TOKEN).long() * 2,
                  "pixel_values_videos": torch.randn(rows * 2 * 4 * 6, 3 * 2 * 4 * 4, generator=g),
                  "video_grid_thw": torch.tensor([grid] * rows)}


@pytest.mark.parametrize("build", [T.qwen2_vl, T.qwen2_5_vl], ids=["qwen2_vl", "qwen2_5_vl"])
def test_video_lossless_and_compressed_per_frame(build):
    model = build()
    inputs = qwen_video_inputs(rows=2)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    lens = {}
    for cls in KINDS:
        d = cls.from_target(model, seed=0, num_q=2)
        out = vispec.generate(model, d, **inputs, max_new_tokens=1)  # prefill + first token only
        lens[cls.drafter_type()] = d.state.lens.tolist()
        full = vispec.generate(model, d, **inputs, max_new_tokens=10, tree=TreeConfig(6, 3, 2))
        assert torch.equal(full.sequences, ref)
    # 12 video tokens in 2 frames of 6: ViSpec keeps num_q - 1 = 1 token per frame.
    assert [e - v for e, v in zip(lens["eagle"], lens["vispec"])] == [12 - 2, 12 - 2]


def test_video_global_feature_is_the_frame_average():
    model = T.llava()
    h = 64
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([[5, 6] + [T.IMAGE_TOKEN] * 8 + [7, 8]])
    inputs = PrefillInputs(input_ids=ids, inputs_embeds=torch.randn(1, 12, h, generator=g),
                           features=torch.randn(1, 12, h, generator=g), lengths=torch.tensor([12]),
                           next_tokens=torch.tensor([3]), image_mask=ids == T.IMAGE_TOKEN, frame_tokens=[[4]])
    d = vispec.ViSpecDrafter.from_target(model, seed=0)
    d.begin(1, 32, torch.device("cpu"))
    x, pos, count = d.prefill_sequence(inputs)
    f1, f2 = d.imadpt(inputs.inputs_embeds[0, 2:6]), d.imadpt(inputs.inputs_embeds[0, 6:10])
    assert torch.allclose(d.state.glob[0], (f1[-1] + f2[-1]) / 2, atol=1e-6)
    # Frames at tokens 2..5 and 6..9 -> drafter positions 1..4 and 5..8: one compressed token at each one's last.
    assert pos[0, : count[0]].tolist() == [0, 4, 8, 9, 10, 11]
    bad = PrefillInputs(**{**inputs.__dict__, "frame_tokens": [[3]]})
    with pytest.raises(ValueError, match="does not split into frames of 3"):
        d.prefill_sequence(bad)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.drafter_type())
def test_draft_vocabulary(tmp_path, cls):
    """A drafter restricted to a token subset scores only those rows, drafts only those tokens, stays lossless,
    and keeps its vocabulary through save / load."""
    model = T.llava()
    inputs = T.llava_inputs([6, 11], seed=4)
    ref = model.generate(**inputs, max_new_tokens=14, do_sample=False)
    d = cls.from_target(model, seed=2)
    full = d.frequent_tokens([ref[0].tolist(), ref[1].tolist(), [5, 5, 5]], 12, always=[3])
    assert len(full) == 12 and 3 in full and 5 in full
    d.set_draft_vocab(full)
    h = torch.randn(2, 3, model.config.text_config.hidden_size)
    lm = model.get_output_embeddings()
    assert d.logits(h).shape == (2, 3, 12)
    torch.testing.assert_close(d.logits(h), lm(h)[..., d.d2t])
    out = vispec.generate(model, d, **inputs, max_new_tokens=14, tree=TreeConfig(8, 3, 3))
    assert torch.equal(out.sequences, ref)
    seen = set()
    orig = d.propose
    d.propose = lambda tree: (lambda t: (seen.update(t.tokens[:, 1:].flatten().tolist()), t)[1])(orig(tree))
    vispec.generate(model, d, **inputs, max_new_tokens=6, tree=TreeConfig(8, 3, 3))
    assert seen and seen <= set(full)
    del d.propose
    d.save_pretrained(tmp_path)
    back = load_drafter(tmp_path, model)
    assert back.config.draft_vocab_size == 12 and torch.equal(back.d2t, d.d2t)
    for bad, msg in [([], "empty"), ([1, 1], "repeated"), ([10**6], "outside")]:
        with pytest.raises(ValueError, match=msg):
            back.set_draft_vocab(bad)


def test_draft_vocabulary_training_loss_is_over_the_subset():
    from vispec.train import TrainConfig, drafter_forward, sample_to_inputs, step_loss

    model = T.llava()
    d = vispec.EagleDrafter.from_target(model, seed=0)
    n, hdim = 9, model.config.text_config.hidden_size
    rec = dict(input_ids=torch.randint(0, 50, (n,)), hidden=torch.randn(n, hdim), image_mask=torch.zeros(n),
               image_embeds=torch.zeros(0, hdim), loss_mask=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]))
    d.set_draft_vocab(list(range(40)))
    loss, parts = step_loss(d, rec, TrainConfig(stage=2, noise=False, passes=1), model.get_input_embeddings())
    loss.backward()
    # L1 between two distributions over the same 40 tokens is at most 2: the target was renormalised over them
    assert 0 < parts["l1"] <= 2 and torch.isfinite(loss)
    assert d.fc.weight.grad is not None
    # The same numbers by hand: both softmaxes over the 40 rows of the full head (not the full softmax sliced).
    with torch.no_grad():
        inputs, tg = sample_to_inputs(rec, model.get_input_embeddings())
        hid, pos = drafter_forward(d, inputs)
        mask = tg["loss_mask"][pos]
        head = model.get_output_embeddings()
        tp = torch.softmax(head(tg["next_features"][pos[mask]])[..., :40].float(), -1)
        dlp = torch.log_softmax(head(hid[mask])[..., :40].float(), -1)
    assert parts["l1"] == pytest.approx(float((dlp.exp() - tp).abs().sum(-1).mean()), rel=1e-4)
    assert parts["ce"] == pytest.approx(float(-(tp * dlp).sum(-1).mean()), rel=1e-4)


def qwen3_video_inputs(rows=2):
    """Qwen3-VL videos: each frame is its own <vision_start> frame <vision_end> block after a timestamp token."""
    g = torch.Generator().manual_seed(0)
    vs, ve, v = T.VISION_START, T.VISION_START + 1, T.VIDEO_TOKEN
    seqs = [torch.tensor([5 + r, 9, 20, vs] + [v] * 6 + [ve, 21, vs] + [v] * 6 + [ve, 11, 12, 13][: 3 - r])
            for r in range(rows)]
    inp = T.pad_rows(seqs, "left")
    return inp | {"mm_token_type_ids": (inp["input_ids"] == v).long() * 2,
                  "pixel_values_videos": torch.randn(rows * 2 * 4 * 6, 3 * 2 * 4 * 4, generator=g),
                  "video_grid_thw": torch.tensor([(2, 4, 6)] * rows)}


def test_qwen3_vl_video_lossless_and_compressed_per_frame():
    model = T.qwen3_vl()
    inputs = qwen3_video_inputs()
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    lens = {}
    for cls in KINDS:
        d = cls.from_target(model, seed=0, num_q=2)
        vispec.generate(model, d, **inputs, max_new_tokens=1)
        lens[cls.drafter_type()] = d.state.lens.tolist()
        assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10, tree=TreeConfig(6, 3, 2)).sequences, ref)
    assert [e - v for e, v in zip(lens["eagle"], lens["vispec"])] == [12 - 2, 12 - 2]  # one token per frame
    assert [e - h for e, h in zip(lens["eagle"], lens["hivis"])] == [12, 12]  # no visual position at all


def test_vispec_without_global_feature():
    """The ablation: no img_fc, text positions read the target feature alone; still lossless."""
    model = T.llava()
    d = vispec.ViSpecDrafter.from_target(model, seed=0, global_feature=False, num_q=3)
    assert not hasattr(d, "img_fc") and not any(k.startswith("img_fc") for k in d.state_dict())
    base = vispec.EagleDrafter.from_target(model, seed=0)
    base.load_state_dict({k: v for k, v in d.state_dict().items() if not k.startswith("imadpt")})
    h = model.config.get_text_config().hidden_size
    e, f = torch.randn(1, 2, h), torch.randn(1, 2, h)
    torch.testing.assert_close(d.fuse(e, f, glob=torch.randn(1, 2, h)), base.fuse(e, f))
    inputs = T.llava_inputs([5, 8], seed=2)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10, tree=TreeConfig(8, 3, 3)).sequences, ref)
