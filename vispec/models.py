"""What the engine needs to know about each supported target class, in one place.

Everything goes through the models' public pieces: ``model.model`` (the base model
returning the last hidden state after the final norm), ``model.lm_head``, the input
embeddings, ``set_attn_implementation`` and a forward pre-hook on the language model
to see the input embeddings (image features merged) of the prefill.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .attention import register as register_attention

TEXT_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
LLAVA_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
QWEN_VL_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
SUPPORTED = TEXT_CLASSES + LLAVA_CLASSES + QWEN_VL_CLASSES

# Inputs a processor returns that the prefill forwards to the model as they are.
MULTIMODAL_INPUTS = {
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
}


@dataclass
class Target:
    model: torch.nn.Module
    kind: str  # "text" | "llava" | "qwen_vl"

    @classmethod
    def wrap(cls, model) -> "Target":
        name = type(model).__name__
        if name in TEXT_CLASSES:
            kind = "text"
        elif name in LLAVA_CLASSES:
            kind = "llava"
        elif name in QWEN_VL_CLASSES:
            kind = "qwen_vl"
        else:
            raise TypeError(
                f"vispec does not support {name}; supported target classes: {', '.join(SUPPORTED)}"
            )
        return cls(model, kind)

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def base(self):
        return self.model.model

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self):
        return self.base if self.kind == "text" else self.base.language_model

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    def image_token_ids(self) -> list[int]:
        cfg = self.model.config
        ids = [getattr(cfg, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in ids if i is not None})

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    # -- attention implementation ------------------------------------------------------------------
    @contextlib.contextmanager
    def tree_attention(self):
        """Routes the language model's attention through vispec's function; restores the previous one after."""
        name = register_attention()
        cfg = self.text_config
        previous = cfg._attn_implementation
        if previous == name:
            yield
            return
        key = "" if self.kind == "text" else "text_config"
        self.model.set_attn_implementation({key: name} if key else name)
        try:
            yield
        finally:
            self.model.set_attn_implementation({key: previous} if key else previous)

    # -- positions ----------------------------------------------------------------------------------
    def _multimodal(self, model_inputs: dict) -> bool:
        return model_inputs.get("image_grid_thw") is not None or model_inputs.get("video_grid_thw") is not None

    def prefill_positions(self, attention_mask: torch.Tensor, model_inputs: dict):
        """Position ids as ``model.generate`` makes them for the (left-padded) prompt.

        Qwen-VL with images: None, so the model computes the M-RoPE positions and its rope deltas.
        """
        self._rope_deltas = None
        if self.kind == "qwen_vl" and self._multimodal(model_inputs):
            return None
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def after_prefill(self, model_inputs: dict, batch: int, device) -> None:
        if self.kind == "qwen_vl":
            # Text-only prompts have no M-RoPE offset (generate sets zeros; the model keeps stale ones).
            fresh = self._multimodal(model_inputs)
            self._rope_deltas = self.base.rope_deltas if fresh else torch.zeros(batch, 1, dtype=torch.long, device=device)

    def tree_positions(self, lens: torch.Tensor, depth: torch.Tensor):
        """Positions of tree nodes: each row's committed length plus the node's depth (+ M-RoPE deltas)."""
        pos = lens.unsqueeze(1) + depth  # (B, N)
        if self.kind == "qwen_vl":
            pos = (pos + self._rope_deltas.to(pos.device)).unsqueeze(0).expand(3, -1, -1)
        return pos

    def frame_tokens(self, ids: torch.Tensor, image_mask: torch.Tensor, model_inputs: dict) -> list[list[int]] | None:
        """Per row, per visual block, the tokens of one frame: Qwen-VL videos hold grid_t frames of
        (h * w / merge^2) tokens each; images (and other models' blocks) are one frame."""
        grid = model_inputs.get("video_grid_thw")
        video_id = getattr(self.model.config, "video_token_id", None)
        if self.kind != "qwen_vl" or grid is None or video_id is None:
            return None
        from .drafters.vispec_drafter import image_blocks

        merge = self.model.config.vision_config.spatial_merge_size
        per_video = [int(h * w) // (merge * merge) for _, h, w in grid.tolist()]
        k, out = 0, []
        for r in range(ids.shape[0]):
            row = []
            for start, end in image_blocks(image_mask[r]):
                if int(ids[r, start]) == video_id and k < len(per_video):
                    row.append(per_video[k])
                    k += 1
                else:
                    row.append(end - start + 1)
            out.append(row)
        return out

    @contextlib.contextmanager
    def capture_input_embeds(self):
        """Records the input embeddings the language model receives (image features merged)."""
        box = {}

        def hook(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None:
                box["inputs_embeds"] = emb

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield box
        finally:
            handle.remove()
