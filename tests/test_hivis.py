"""HiViS as its paper / release define it: step-dependent residuals, multi-step self-feedback with dynamic
data selection, the release's checkpoint layout; on both drafter generations."""
import json

import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import PrefillInputs, TreeConfig


@pytest.mark.parametrize("gen", [2, 3])
@pytest.mark.parametrize("build,make", [(T.llava, T.llava_inputs), (T.qwen2_5_vl, T.qwen_inputs)], ids=["llava", "qwen2_5_vl"])
def test_residual_drafter_is_lossless(gen, build, make):
    model = build()
    inputs = make([5, 9], seed=4)
    ref = model.generate(**inputs, max_new_tokens=14, do_sample=False)
    d = vispec.HiViSDrafter.from_target(model, seed=2, generation=gen, hivis_residuals=3)
    assert d.residual.shape == (3, model.config.get_text_config().hidden_size)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=14, tree=TreeConfig(10, 3, 4)).sequences, ref)


def test_residual_of_each_step_enters_fc():
    """EAGLE-2 head: fc([e ; f ; r_s]) with s = 0 for the target's features, s = j at draft step j, clipped."""
    model = T.llava()
    d = vispec.HiViSDrafter.from_target(model, seed=0, hivis_residuals=2)
    h = model.config.get_text_config().hidden_size
    assert d.fc.weight.shape == (h, 3 * h)
    e, f = torch.randn(1, 3, h), torch.randn(1, 3, h)
    for step, row in ((0, 0), (1, 1), (4, 1)):
        want = d.fc(torch.cat([e, f, d.residual[row].expand(1, 3, h)], -1))
        torch.testing.assert_close(d.fuse(e, f, step=step), want)
    # Drafting uses step d - 1 for the frontier at depth d - 1: record the steps propose asks for.
    seen = []
    fuse = d.fuse
    d.fuse = lambda *a, **k: (seen.append(k.get("step", 0)), fuse(*a, **k))[1]
    inputs = T.llava_inputs([6], seed=1)
    vispec.generate(model, d, **inputs, max_new_tokens=6, tree=TreeConfig(8, 4, 2))
    assert seen[0] == 0 and {1, 2, 3} <= set(seen) and max(seen) == 3


def test_from_drafter_keeps_outputs_and_expands_residuals():
    model = T.llava()
    plain = vispec.HiViSDrafter.from_target(model, seed=0)
    d = vispec.HiViSDrafter.from_drafter(plain, model, hivis_residuals=1)  # zero columns for r: same head
    h = model.config.get_text_config().hidden_size
    e, f = torch.randn(1, 2, h), torch.randn(1, 2, h)
    torch.testing.assert_close(d.fuse(e, f), plain.fuse(e, f))
    d3 = vispec.HiViSDrafter.from_drafter(d, model, hivis_residuals=3)  # stage 2: K = 1 -> 3, rows start as row 0
    assert all(torch.equal(d3.residual[i], d.residual[0]) for i in range(3))


def test_official_hivis_layout(tmp_path):
    """The release's names: EAGLE-2 keys, fc over [e ; f ; r] (3H), ``residual`` (K, H) or the legacy
    ``adaptive_embedding``."""
    model = T.llava()
    tc = model.config.get_text_config()
    h, heads, kv, inter, v = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size, tc.vocab_size
    hd = h // heads
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    state = {
        "fc.weight": rnd(h, 3 * h), "fc.bias": rnd(h), "residual": rnd(3, h),
        "layers.0.self_attn.q_proj.weight": rnd(heads * hd, h), "layers.0.self_attn.k_proj.weight": rnd(kv * hd, h),
        "layers.0.self_attn.v_proj.weight": rnd(kv * hd, h), "layers.0.self_attn.o_proj.weight": rnd(h, heads * hd),
        "layers.0.mlp.gate_proj.weight": rnd(inter, h), "layers.0.mlp.up_proj.weight": rnd(inter, h),
        "layers.0.mlp.down_proj.weight": rnd(h, inter), "layers.0.post_attention_layernorm.weight": 1 + rnd(h),
        "embed_tokens.weight": rnd(v, h),
    }
    cfg = {"hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
           "vocab_size": v, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bias": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for key in ("residual", "adaptive_embedding"):
        st = {(key if k == "residual" else k): t for k, t in state.items()}
        torch.save(st, tmp_path / "pytorch_model.bin")
        d = vispec.HiViSDrafter.from_official(tmp_path, model)
        assert d.config.hivis_residuals == 3 and torch.equal(d.residual, state["residual"])
        assert torch.equal(d.fc.weight, state["fc.weight"])
    inputs = T.llava_inputs([5], seed=2)
    ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(vispec.generate(model, d, **inputs, max_new_tokens=10).sequences, ref)


@pytest.mark.parametrize("gen", [2, 3])
def test_hivis_stage_selects_data_dynamically(gen):
    """Stage "hivis": 3 unrolled steps; with dynamic selection, chains whose draft top-k misses the target's
    top-1 leave the later steps' loss (fewer scored pairs), and a top-k covering the vocabulary drops none."""
    from vispec.train import TrainConfig, step_loss

    model = T.llama(num_hidden_layers=4)
    d = vispec.HiViSDrafter.from_target(model, seed=0, generation=gen, hivis_residuals=3)
    n, h = 14, model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    rec = dict(input_ids=torch.randint(0, 150, (n,), generator=g), hidden=torch.randn(n, h, generator=g),
               image_mask=torch.zeros(n), image_embeds=torch.zeros(0, h),
               aux_hidden=torch.randn(n, 3 * h, generator=g), loss_mask=torch.tensor([0] * 4 + [1] * 10))
    embed = model.get_input_embeddings()
    _, all_kept = step_loss(d, rec, TrainConfig(stage="hivis", select_topk=T.VOCAB, noise=False), embed)
    loss, none = step_loss(d, rec, TrainConfig(stage="hivis", select_topk=0, noise=False), embed)
    _, sel = step_loss(d, rec, TrainConfig(stage="hivis", select_topk=1, noise=False), embed)
    assert all_kept["scored"] == none["scored"] > sel["scored"] >= 9  # step 0 always scores its 9 positions
    assert sel["topk"] > 0 and (gen == 3 or sel["feature"] > 0)
    loss.backward()
    assert d.residual.grad is not None and d.residual.grad[1:].abs().sum() > 0  # later steps train their rows


def test_hivis_topk_loss_and_step_weights_are_the_releases():
    """HiViS's top-k loss takes the target's probabilities of its top-k as they are (not renormalised over
    the k); its stage weighs the self-fed steps alike, where EAGLE-3's test decays them by 0.8 per step."""
    from vispec.train import TrainConfig, step_loss, topk_ce

    target = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), -1)
    draft = torch.log_softmax(torch.tensor([[0.5, 1.0, -1.0, 2.0, 0.0]]), -1)
    want = -sum(float(target[0, t].exp() * draft[0, t]) for t in (0, 1, 2))
    assert abs(float(topk_ce(draft, target, k=3)) - want) < 1e-6
    assert TrainConfig(stage="hivis").options(2)["ttt_decay"] == 1.0
    assert TrainConfig(stage=1).options(3)["ttt_decay"] == 0.8
    with pytest.raises(ValueError, match="ttt_decay"):
        TrainConfig(stage="hivis", ttt_decay=0.0).options(2)
    # The weights reach the loss: with decay 1 every step's parts count fully, more than with 0.5.
    model = T.llama(num_hidden_layers=4)
    d = vispec.HiViSDrafter.from_target(model, seed=0, hivis_residuals=3)
    n, h = 14, model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    rec = dict(input_ids=torch.randint(0, 150, (n,), generator=g), hidden=torch.randn(n, h, generator=g),
               image_mask=torch.zeros(n), image_embeds=torch.zeros(0, h), loss_mask=torch.tensor([0] * 4 + [1] * 10))
    embed = model.get_input_embeddings()
    cfg = dict(stage="hivis", select_topk=0, noise=False)
    _, alike = step_loss(d, rec, TrainConfig(**cfg), embed)
    _, first = step_loss(d, rec, TrainConfig(**cfg, ttt_steps=1), embed)
    _, half = step_loss(d, rec, TrainConfig(**cfg, ttt_decay=0.5), embed)
    later = alike["topk"] - first["topk"]  # steps 1 and 2 at weight 1
    assert later > 0 and half["topk"] < alike["topk"]
