"""Export a vispec drafter in the layout SGLang and vLLM load, for serving at scale.

    vispec export --format sglang runs/s2/final served/      # or --format vllm

Layouts (read from the engines' loaders: SGLang 0.5.23 ``srt/models/llama_eagle.py`` /
``llama_eagle3.py``; vLLM ``model_executor/models/llama_eagle.py`` / ``llama_eagle3.py``):

- EAGLE-2 heads -> ``LlamaForCausalLMEagle``: ``fc.weight`` (H, 2H) + ``fc.bias``, ``layers.0.*`` (no
  input layernorm), no norm, no lm_head (the target's is used). SGLang's fc always has a bias (a head
  without one gets zeros); vLLM's never has one and would drop ours, so a head with a non-zero bias
  is refused for vLLM. A draft vocabulary is SGLang's hot-token map (``speculative_token_map.pt``,
  pass it as ``--speculative-token-map``); vLLM has none for EAGLE-2 heads and drafts over the whole
  vocabulary (lossless all the same, other drafts).
- EAGLE-3 heads -> ``LlamaForCausalLMEagle3``: ``fc.weight`` (H, 3H), ``midlayer.*``, ``norm.weight``,
  ``lm_head.weight`` (draft vocabulary, H), ``d2t`` (offsets: token = draft index + d2t) and ``t2d``
  (bool over the vocabulary); ``draft_vocab_size``. The captured layers: SGLang numbers a layer's
  output (``eagle_config.eagle_aux_hidden_state_layer_ids`` = ours - 1), vLLM a layer's input
  (top-level ``eagle_aux_hidden_state_layer_ids`` = ours).
- Names carry no ``model.`` prefix (vLLM adds it, SGLang accepts both); the target's ``embed_tokens``
  is left out (both engines share the target's; vLLM would keep a copy that differs from it).
- Positions: vispec's drafters use 1-D RoPE over sequence positions, so no ``rope_scaling`` (M-RoPE)
  is written for Qwen-VL targets: with ``mrope_section`` the engines would feed them M-RoPE positions
  they were not trained with.

What those engines cannot run is refused, naming what would be lost: ViSpec's vision adaptor and
global feature, HiViS's residuals, and HiViS's text-only drafter input (the engines feed the drafter
every prompt token). ``base_only=True`` (``--as-eagle-base``) exports such a drafter's EAGLE head
alone, when that is what the user wants.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .drafters.eagle import CONFIG_NAME, WEIGHTS_NAME, DrafterConfig

FORMATS = ("sglang", "vllm")
ARCHITECTURES = {2: "LlamaForCausalLMEagle", 3: "LlamaForCausalLMEagle3"}
TOKEN_MAP_NAME = "speculative_token_map.pt"
# What each kind adds to its EAGLE base that SGLang / vLLM cannot run.
_EXTRAS = {
    "vispec": "the vision adaptor (compressed image tokens) and the global image feature",
    "hivis": "the text-only drafter input (the engines feed the drafter the visual tokens too)",
}


def read_drafter(path) -> tuple[DrafterConfig, dict]:
    """A vispec drafter directory's config and state dict, without its target."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: not a vispec drafter directory")
    return DrafterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text())), load_file(str(path / WEIGHTS_NAME))


def export(src, out, fmt: str, base_only: bool = False) -> dict:
    """Writes the drafter at ``src`` to ``out`` (config.json, model.safetensors[, token map]) for ``fmt``.
    Returns {"architecture", "files", "notes"}."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    c, state = read_drafter(src)
    notes = []
    lost = []
    if c.drafter_type in _EXTRAS:
        lost.append(_EXTRAS[c.drafter_type])
    if c.hivis_residuals:
        lost.append(f"HiViS's {c.hivis_residuals} step-dependent residuals")
    if lost and not base_only:
        raise ValueError(f"{fmt} cannot run what this {c.drafter_type} drafter adds to its EAGLE head: "
                         f"{' and '.join(lost)}; export the EAGLE head "
                         "alone with --as-eagle-base (its drafts will then differ from vispec's)")
    if lost:
        notes.append(f"exported the EAGLE base only: without {' and '.join(lost)}")
    h = c.hidden_size
    keep = ("fc.", "layers.0.") if c.generation == 2 else ("fc.", "midlayer.", "norm.", "lm_head.")
    tensors = {k: v for k, v in state.items() if k.startswith(keep)}
    if c.hivis_residuals and c.generation == 2:  # fc reads [e ; f ; r_s]: the base drops the r columns
        tensors["fc.weight"] = tensors["fc.weight"][:, : 2 * h].contiguous()
    bias = tensors.get("fc.bias")
    if fmt == "vllm" and bias is not None and bool(bias.any()):
        raise ValueError("vLLM's EAGLE heads have no fc bias and would silently drop this drafter's (non-zero) one; "
                         "export it for SGLang, or train the head with fc_bias=False")
    if fmt == "vllm":
        tensors.pop("fc.bias", None)
    elif c.generation == 2 and bias is None:
        tensors["fc.bias"] = torch.zeros(h, dtype=tensors["fc.weight"].dtype)  # SGLang's EAGLE-2 fc has one
    dtype = tensors["fc.weight"].dtype
    config = {
        "architectures": [ARCHITECTURES[c.generation]], "model_type": "llama", "hidden_size": h,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "num_hidden_layers": 1,
        "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": c.qkv_bias, "qkv_bias": c.qkv_bias,
        "bias": "fc.bias" in tensors, "torch_dtype": str(dtype).removeprefix("torch."),
        "max_position_embeddings": 32768,
    }
    files = [CONFIG_NAME, WEIGHTS_NAME]
    ids = state.get("d2t")
    if c.generation == 3:
        dv = c.draft_vocab_size or c.vocab_size
        ids = torch.arange(dv) if ids is None else ids.long()
        tensors["d2t"] = ids - torch.arange(dv)
        tensors["t2d"] = torch.zeros(c.vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
        config["draft_vocab_size"] = dv
        if fmt == "sglang":
            if 0 in c.feature_layers:
                raise ValueError("SGLang numbers captured layers by their output; this drafter reads the embeddings "
                                 "(layer 0's input), which it cannot capture")
            config["eagle_config"] = {"use_aux_hidden_state": True,
                                      "eagle_aux_hidden_state_layer_ids": [i - 1 for i in c.feature_layers]}
        else:
            config["eagle_aux_hidden_state_layer_ids"] = list(c.feature_layers)
            config["eagle_config"] = {"use_aux_hidden_state": True}
    elif ids is not None:
        if fmt == "sglang":
            files.append(TOKEN_MAP_NAME)
            notes.append(f"the draft vocabulary ({ids.numel()} tokens) is in {TOKEN_MAP_NAME}: "
                         f"pass --speculative-token-map {Path(out) / TOKEN_MAP_NAME}")
        else:
            notes.append(f"vLLM has no draft vocabulary for EAGLE-2 heads: it drafts over all {c.vocab_size} tokens, "
                         f"not the {ids.numel()} this head was trained on (output unchanged, drafts may differ)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if TOKEN_MAP_NAME in files:
        torch.save(ids.long().clone(), out / TOKEN_MAP_NAME)
    (out / "vispec_export.json").write_text(json.dumps({"format": fmt, "source": asdict(c), "notes": notes}, indent=2))
    return {"architecture": ARCHITECTURES[c.generation], "files": files, "notes": notes}
