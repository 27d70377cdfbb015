"""vispec export: SGLang / vLLM layouts of EAGLE-2 and EAGLE-3 heads; round trip through from_official.

Neither engine imports on this CPU machine (SGLang 0.5.23 needs triton, CUDA kernels and a matching
torchvision; vLLM its CUDA build), so the exported names are checked against the engines' loaders as
their source defines them (the parameter names of their model classes and the renames of their
``load_weights``), re-stated below.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as T
import vispec
from vispec.cli import main
from vispec.drafters import PrefillInputs
from vispec.export import export


def engine_params(arch: str, engine: str) -> set[str]:
    """Parameter names of the engine's draft model class (the target's embed_tokens excluded)."""
    layer = [f"model.layers.0.{n}" for n in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                              "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
                                              "post_attention_layernorm.weight")]
    if arch == "LlamaForCausalLMEagle":  # layer 0 without input_layernorm, no norm, no own lm_head
        return {"model.fc.weight", *layer} | ({"model.fc.bias"} if engine == "sglang" else set())
    return {"model.fc.weight", *layer, "model.layers.0.hidden_norm.weight", "model.layers.0.input_layernorm.weight",
            "model.norm.weight", "lm_head.weight"}


def engine_load(names, arch: str, engine: str) -> set[str]:
    """Where each file tensor lands under the engine's load_weights (SGLang: legacy midlayer -> layers.0,
    q/k/v -> qkv_proj, gate/up -> gate_up_proj, name or model.+name; d2t -> hot tokens, t2d skipped. vLLM:
    model. prefixed to all but lm_head, midlayer. -> layers.0., the same fusions; d2t ->
    draft_id_to_target_id, t2d skipped)."""
    out = set()
    for n in names:
        if n in ("d2t", "t2d"):
            continue
        if engine == "vllm" and n.startswith("model."):
            raise AssertionError(f"{n}: vLLM prefixes model. itself")
        n = n.replace("midlayer.", "layers.0.")
        for a, b in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                     (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
            n = n.replace(a, b)
        out.add(n if n.startswith(("lm_head", "model.")) else f"model.{n}")
    return out


def teacher_forced_logits(d, model, feats_width, seed=0):
    h = model.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(seed)
    t = 7
    inputs = PrefillInputs(input_ids=torch.zeros(1, t, dtype=torch.long), inputs_embeds=torch.randn(1, t, h, generator=g),
                           features=torch.randn(1, t, feats_width, generator=g), lengths=torch.tensor([t]),
                           next_tokens=torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        hid, _ = d.forward_sequence(inputs)
        return d.logits(hid[0]), d.token_ids(torch.arange(d.logits(hid[0]).shape[-1]))


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("gen", [2, 3])
def test_export_loads_without_missing_or_unexpected_keys_and_round_trips(tmp_path, engine, gen):
    model = T.llama(num_hidden_layers=6)
    h = model.config.hidden_size
    d = vispec.EagleDrafter.from_target(model, seed=1, generation=gen, **({"fc_bias": False} if gen == 2 else {}))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms away from 1
    d.set_draft_vocab(list(range(3, 120, 3)))
    d.save_pretrained(tmp_path / "src")
    res = export(tmp_path / "src", tmp_path / "out", engine)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    arch = cfg["architectures"][0]
    assert arch == ("LlamaForCausalLMEagle3" if gen == 3 else "LlamaForCausalLMEagle") == res["architecture"]
    assert not any("embed_tokens" in k for k in sd) and cfg["num_hidden_layers"] == 1 and not cfg["tie_word_embeddings"]
    assert engine_load(sd, arch, engine) == engine_params(arch, engine)  # nothing missing, nothing unexpected
    if gen == 3:
        ids = torch.arange(cfg["draft_vocab_size"]) + sd["d2t"]
        assert torch.equal(ids, d.d2t) and torch.equal(sd["t2d"].nonzero().squeeze(1), d.d2t)
        ours = d.feature_layers
        if engine == "sglang":  # SGLang: outputs of layers; vLLM: inputs
            assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in ours]
        else:
            assert cfg["eagle_aux_hidden_state_layer_ids"] == ours
        assert "bias" not in "".join(k for k in sd if k.startswith("fc."))
    elif engine == "sglang":
        assert torch.equal(sd["fc.bias"], torch.zeros(h))  # SGLang's EAGLE-2 fc always has a bias
        assert torch.equal(torch.load(tmp_path / "out" / "speculative_token_map.pt"), d.d2t)
    else:
        assert any("whole vocabulary" in n or "all" in n for n in res["notes"])
    # Round trip: the engines' layout loads back with identical logits.
    back = vispec.EagleDrafter.from_official(tmp_path / "out", model)
    width = 3 * h if gen == 3 else h
    want, want_ids = teacher_forced_logits(d, model, width)
    got, got_ids = teacher_forced_logits(back, model, width)
    if gen == 2 and engine == "vllm":  # no draft vocabulary there: the same head over the whole vocabulary
        got = got[:, d.d2t]
        got_ids = got_ids[d.d2t]
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_what_the_engines_cannot_run_is_refused(tmp_path):
    model = T.llava()
    h = model.config.get_text_config().hidden_size
    vispec.ViSpecDrafter.from_target(model, seed=0).save_pretrained(tmp_path / "vispec")
    vispec.HiViSDrafter.from_target(model, seed=0, hivis_residuals=2).save_pretrained(tmp_path / "hivis")
    d = vispec.EagleDrafter.from_target(model, seed=0)
    with torch.no_grad():
        d.fc.bias.normal_()
    d.save_pretrained(tmp_path / "biased")
    with pytest.raises(ValueError, match="vision adaptor.*--as-eagle-base"):
        export(tmp_path / "vispec", tmp_path / "o1", "sglang")
    with pytest.raises(ValueError, match="text-only drafter input .* and HiViS's 2 step-dependent residuals"):
        export(tmp_path / "hivis", tmp_path / "o2", "vllm")
    with pytest.raises(ValueError, match="no fc bias"):
        export(tmp_path / "biased", tmp_path / "o3", "vllm")
    res = export(tmp_path / "hivis", tmp_path / "o4", "sglang", base_only=True)
    sd = load_file(str(tmp_path / "o4" / "model.safetensors"))
    assert sd["fc.weight"].shape == (h, 2 * h) and "residual" not in sd and "EAGLE base only" in res["notes"][0]
    sd = load_file(str(export(tmp_path / "vispec", tmp_path / "o5", "sglang", base_only=True) and
                       tmp_path / "o5" / "model.safetensors"))
    assert not any(k.startswith(("imadpt", "img_fc")) for k in sd)
    # The CLI: refused with exit 2 and the reason, then written with the flag.
    assert main(["export", "--format", "sglang", str(tmp_path / "vispec"), str(tmp_path / "o6")]) == 2
    assert main(["export", "--format", "sglang", "--as-eagle-base", str(tmp_path / "vispec"), str(tmp_path / "o6")]) == 0
    assert main(["export", "--format", "vllm", str(tmp_path / "missing"), str(tmp_path / "o7")]) == 2
