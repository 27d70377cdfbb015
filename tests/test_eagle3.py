"""EAGLE-3 generation of drafters: layer capture, the training-time test, losslessness, training."""
import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import DRAFTERS, PrefillInputs, TreeConfig, load_drafter
from vispec.drafters.eagle import DrafterConfig, eagle3_layers

KINDS = list(DRAFTERS.values())


def record_features(drafter):
    """Wraps prefill / extend to keep what the engine hands the drafter."""
    seen = {"prefill": None, "extend": []}
    prefill, extend = drafter.prefill, drafter.extend

    def pre(inputs):
        seen["prefill"] = inputs
        return prefill(inputs)

    def ext(tokens, features, n_valid):
        seen["extend"].append((tokens.clone(), features.clone(), n_valid.clone()))
        return extend(tokens, features, n_valid)

    drafter.prefill, drafter.extend = pre, ext
    return seen


@pytest.mark.parametrize("build,make", [(lambda: T.llama(num_hidden_layers=6), T.text_inputs),
                                        (T.qwen2_vl, T.qwen_inputs)], ids=["llama", "qwen2_vl"])
def test_captured_features_are_those_layers_hidden_states(build, make):
    """What the drafter reads in the prefill and after each verification = hidden_states[i] of the
    layers it names, from one plain forward over the final sequence (right positions, right layers)."""
    model = build()
    n = model.config.get_text_config().num_hidden_layers
    layers = [0, n - 1] if n < 3 else [0, 2, n - 1]
    d = vispec.EagleDrafter.from_target(model, seed=1, generation=3, feature_layers=layers)
    seen = record_features(d)
    inputs = make([7], seed=2)
    out = vispec.generate(model, d, **inputs, max_new_tokens=10, tree=TreeConfig(8, 3, 3))
    seq = out.sequences
    p = inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for k, v in extra.items():  # per-token inputs (Qwen's mm_token_type_ids): the answer is text
        if v.dim() == 2 and v.shape[1] == p:
            extra[k] = torch.cat([v, torch.zeros_like(seq[:, p:]).to(v.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=torch.ones_like(seq), output_hidden_states=True, **extra)
    want = torch.cat([full.hidden_states[i] for i in layers], -1)[0]  # (L, n * H)
    pre = seen["prefill"]
    torch.testing.assert_close(pre.features[0, :p], want[:p], atol=1e-4, rtol=1e-4)
    at = p  # committed tokens after the prompt: the first generated token's features come from the first step
    for tokens, feats, nv in seen["extend"]:
        k = int(nv[0])
        # The accepted tokens are seq[at : at + k] (the root first), their states those of positions at - 1 ...
        assert torch.equal(tokens[0, :k], seq[0, at + 1 : at + 1 + k])
        torch.testing.assert_close(feats[0, :k], want[at : at + k], atol=1e-4, rtol=1e-4)
        at += k


def test_default_layers_and_config_errors():
    assert eagle3_layers(32) == [2, 16, 29]  # EAGLE-3's: inputs of layers 2, L/2, L-3
    assert eagle3_layers(2) == [1, 1, 0]
    base = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                vocab_size=10)
    with pytest.raises(ValueError, match="feature_layers"):
        DrafterConfig(**base, generation=3)
    with pytest.raises(ValueError, match="EAGLE-3 setting"):
        DrafterConfig(**base, feature_layers=[1])
    with pytest.raises(ValueError, match="generation"):
        DrafterConfig(**base, generation=4)
    model = T.llava()
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        vispec.EagleDrafter.from_target(model, generation=3, feature_layers=[0, 5]).check_target(model)


def test_unrolled_steps_match_drafting_one_chain():
    """forward_sequence(steps=k) (the training-time test) = the decoding path: the prefix committed, then
    a chain of k - 1 draft inputs, each its parent's output with the next token's embedding."""
    torch.manual_seed(0)
    model = T.llama(num_hidden_layers=4)
    for gen in (2, 3):
        d = vispec.EagleDrafter.from_target(model, seed=3, generation=gen)
        n_layers = len(d.feature_layers) if gen == 3 else 1
        h = model.config.hidden_size
        L, steps = 12, 4
        ids = torch.randint(1, 100, (L,))
        emb = model.get_input_embeddings()(ids).detach()
        feats = torch.randn(L, n_layers * h)
        inputs = PrefillInputs(input_ids=ids[:-1][None], inputs_embeds=emb[:-1][None], features=feats[:-1][None],
                               lengths=torch.tensor([L - 1]), next_tokens=ids[-1:])
        with torch.no_grad():
            hid, pos = d.forward_sequence(inputs, steps=steps, embeds=emb)
            assert hid.shape == (steps, L - 1, h) and torch.equal(pos, torch.arange(L - 1))
            # Unrolling only from position 5 (earlier ones are never scored) changes nothing there.
            part, _ = d.forward_sequence(inputs, steps=steps, embeds=emb, unroll_from=5)
            torch.testing.assert_close(part[:, 5:], hid[:, 5:], atol=1e-5, rtol=1e-5)
            assert torch.equal(part[0], hid[0]) and not part[1:, :5].any()
            for t in (0, 3, 6):
                d.begin(1, 64, torch.device("cpu"))
                d.prefill(PrefillInputs(input_ids=ids[: t + 1][None], inputs_embeds=emb[: t + 1][None],
                                        features=feats[: t + 1][None], lengths=torch.tensor([t + 1]),
                                        next_tokens=ids[t + 1 : t + 2]))
                torch.testing.assert_close(d.state.last_hidden[0], hid[0, t], atol=1e-5, rtol=1e-5)
                for j in range(1, steps):
                    x = d.fuse(emb[t + 1 + j][None, None], d.state.last_hidden[:, None], step=j)
                    d._append(x, torch.tensor([[t + j]]), torch.tensor([1]), ids[:1])
                    torch.testing.assert_close(d.state.last_hidden[0], hid[j, t], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_and_own_head(tmp_path):
    model = T.qwen2_vl()
    for cls in KINDS:
        d = cls.from_target(model, seed=3, generation=3)
        d.set_draft_vocab(list(range(0, 120, 2)))
        # The own lm_head starts as the target's rows of the draft vocabulary, after the drafter's norm.
        h = torch.randn(3, model.config.get_text_config().hidden_size)
        torch.testing.assert_close(d.logits(h), model.get_output_embeddings()(d.norm(h))[:, d.d2t])
        d.save_pretrained(tmp_path / d.drafter_type())
        back = load_drafter(tmp_path / d.drafter_type(), model)
        assert type(back) is cls and back.config.generation == 3 and back.feature_layers == d.feature_layers
        sd = d.state_dict()
        assert {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight",
                "lm_head.weight", "d2t"} <= sd.keys() and "fc.bias" not in sd
        assert sd["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h.shape[1]
        assert all(torch.equal(sd[k], v) for k, v in back.state_dict().items())


def test_vispec_stage2_from_an_eagle3_head_keeps_its_base():
    model = T.llava()
    s1 = vispec.EagleDrafter.from_target(model, seed=0, generation=3)
    s1.set_draft_vocab(list(range(50)))
    d = vispec.ViSpecDrafter.from_drafter(s1, model, seed=1)
    assert d.config.generation == 3 and d.feature_layers == s1.feature_layers and torch.equal(d.d2t, s1.d2t)
    assert torch.equal(d.lm_head.weight, s1.lm_head.weight) and torch.equal(d.fc.weight, s1.fc.weight)
    inputs = T.llava_inputs([6], seed=3)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10).sequences, ref)


def test_ttt_loss_masks_positions_outside_the_draft_vocabulary():
    """EAGLE-3's position mask: where the target's argmax is outside the draft vocabulary, nothing is scored."""
    from vispec.train import TrainConfig, step_loss

    model = T.llama(num_hidden_layers=4)
    d = vispec.EagleDrafter.from_target(model, seed=0, generation=3)
    n, h = 10, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    rec = dict(input_ids=torch.randint(0, 50, (n,), generator=g), hidden=hidden, image_mask=torch.zeros(n),
               image_embeds=torch.zeros(0, h), aux_hidden=torch.randn(n, 3 * h, generator=g),
               loss_mask=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]))
    top = model.get_output_embeddings()(hidden).argmax(-1)
    embed = model.get_input_embeddings()
    d.set_draft_vocab([t for t in range(T.VOCAB) if t not in set(top.tolist())])  # every target choice left out
    loss, parts = step_loss(d, rec, TrainConfig(stage=1), embed)
    assert float(loss.detach()) == 0.0 and parts["ce"] == 0.0
    d.set_draft_vocab(sorted(set(top.tolist()) | {1, 2, 3}))
    loss, parts = step_loss(d, rec, TrainConfig(stage=1), embed)
    loss.backward()
    assert parts["ce"] > 0 and d.midlayer.self_attn.q_proj.weight.grad is not None
    # Later unroll steps are scored too: a 1-step unroll sees less loss.
    _, one = step_loss(d, rec, TrainConfig(stage=1, ttt_steps=1), embed)
    assert one["ce"] < parts["ce"]
    with pytest.raises(ValueError, match="aux_hidden"):
        step_loss(d, {k: v for k, v in rec.items() if k != "aux_hidden"}, TrainConfig(stage=1), embed)
    with pytest.raises(ValueError, match="w_feature"):
        step_loss(d, rec, TrainConfig(stage=1, w_feature=1.0), embed)
    with pytest.raises(ValueError, match="use ttt_steps"):
        step_loss(d, rec, TrainConfig(stage=1, passes=2), embed)
    with pytest.raises(ValueError, match="passes=1 or ttt_steps=1"):
        TrainConfig(passes=2, ttt_steps=3).options(2)


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def eagle3_by_hand(sd, cfg, emb, feats, eps=1e-6):
    """The EAGLE-3 head as its release code computes it, over a teacher-forced sequence: logits (T, Vd)."""
    h, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    t = emb.shape[0]
    x = feats @ sd["fc.weight"].T
    a = torch.cat([rms(emb, sd["midlayer.input_layernorm.weight"], eps), rms(x, sd["midlayer.hidden_norm.weight"], eps)], -1)
    q = (a @ sd["midlayer.self_attn.q_proj.weight"].T).view(t, nh, hd).transpose(0, 1)
    k = (a @ sd["midlayer.self_attn.k_proj.weight"].T).view(t, nkv, hd).transpose(0, 1)
    v = (a @ sd["midlayer.self_attn.v_proj.weight"].T).view(t, nkv, hd).transpose(0, 1)
    pos = torch.arange(t)
    q, k = rotate(q, pos, cfg["rope_theta"]), rotate(k, pos, cfg["rope_theta"])
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    att = (q @ k.transpose(1, 2)) / hd**0.5 + torch.full((t, t), float("-inf")).triu(1)
    o = (att.softmax(-1) @ v).transpose(0, 1).reshape(t, nh * hd) @ sd["midlayer.self_attn.o_proj.weight"].T
    x1 = x + o
    m = rms(x1, sd["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(m @ sd["midlayer.mlp.gate_proj.weight"].T) * (m @ sd["midlayer.mlp.up_proj.weight"].T))
    out = x1 + mlp @ sd["midlayer.mlp.down_proj.weight"].T
    return rms(out, sd["norm.weight"], eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("layers_key", ["sglang", "vllm", "default"])
def test_official_eagle3_checkpoint(tmp_path, layers_key):
    """A state dict with exactly the published EAGLE-3 names and shapes (SpecForge / SafeAILab) loads; the
    drafter's logits equal a hand-written forward of that layout; d2t offsets map draft ids to tokens."""
    from safetensors.torch import save_file

    model = T.llama(num_hidden_layers=6)
    tc = model.config
    h, nh, nkv, inter, vocab = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size, tc.vocab_size
    hd, dv = h // nh, 40
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    used = torch.randperm(vocab, generator=g)[:dv].sort().values
    sd = {
        "fc.weight": rnd(h, 3 * h),
        "midlayer.self_attn.q_proj.weight": rnd(nh * hd, 2 * h), "midlayer.self_attn.k_proj.weight": rnd(nkv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": rnd(nkv * hd, 2 * h), "midlayer.self_attn.o_proj.weight": rnd(h, nh * hd),
        "midlayer.mlp.gate_proj.weight": rnd(inter, h), "midlayer.mlp.up_proj.weight": rnd(inter, h),
        "midlayer.mlp.down_proj.weight": rnd(h, inter),
        "midlayer.hidden_norm.weight": 1 + rnd(h), "midlayer.input_layernorm.weight": 1 + rnd(h),
        "midlayer.post_attention_layernorm.weight": 1 + rnd(h), "norm.weight": 1 + rnd(h),
        "lm_head.weight": rnd(dv, h) * 10,
        "d2t": used - torch.arange(dv), "t2d": torch.isin(torch.arange(vocab), used),
        "embed_tokens.weight": rnd(vocab, h),  # some releases ship it: ignored
    }
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "num_hidden_layers": 1,
           "vocab_size": vocab, "draft_vocab_size": dv, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    want_layers = {"sglang": [1, 3, 4], "vllm": [1, 3, 4], "default": eagle3_layers(6)}[layers_key]
    if layers_key == "sglang":
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 2, 3]}  # outputs of layers 0, 2, 3
    elif layers_key == "vllm":
        cfg["eagle_aux_hidden_state_layer_ids"] = [1, 3, 4]  # inputs of layers 1, 3, 4
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "model.safetensors"))
    d = vispec.EagleDrafter.from_official(tmp_path, model)
    assert d.config.generation == 3 and d.feature_layers == want_layers and torch.equal(d.d2t, used)
    # Teacher-forced logits vs the hand-written forward.
    t = 9
    emb = torch.randn(t, h, generator=g)
    feats = torch.randn(t, 3 * h, generator=g)
    with torch.no_grad():
        hid, _ = d.forward_sequence(PrefillInputs(input_ids=torch.zeros(1, t, dtype=torch.long), inputs_embeds=emb[None],
                                                  features=feats[None], lengths=torch.tensor([t]),
                                                  next_tokens=torch.zeros(1, dtype=torch.long)))
        shifted = torch.cat([emb[1:], model.get_input_embeddings()(torch.zeros(1, dtype=torch.long))])
        torch.testing.assert_close(d.logits(hid[0]), eagle3_by_hand(sd, cfg, shifted, feats), atol=1e-4, rtol=1e-4)
    # Draft index -> token via the offsets; generation stays lossless.
    assert torch.equal(d.token_ids(torch.arange(dv)), torch.arange(dv) + sd["d2t"])
    inputs = T.text_inputs([6], seed=3)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10, tree=TreeConfig(8, 3, 3)).sequences, ref)
    # Layouts vispec cannot run faithfully are refused, naming why.
    for bad, msg in [({"num_hidden_layers": 2}, "2-layer"), ({"target_hidden_size": 2 * h}, "target_hidden_size"),
                     ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}, "M-RoPE"),
                     ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2]}}, "fc reads 3")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=msg):
            vispec.EagleDrafter.from_official(tmp_path, model)
