"""Tiny random-weight targets of every supported class, built from configs (no hub access)."""
from __future__ import annotations

import torch

VOCAB = 160
IMAGE_TOKEN = 150
PAD = 0


def _text_cfg(**over):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD, eos_token_id=None,
        bos_token_id=None, tie_word_embeddings=False,
    )
    cfg.update(over)
    return LlamaConfig(**cfg)


def llama(seed=0, **over):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_text_cfg(**over)).eval()


def llava(seed=0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=32,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=_text_cfg(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


LLAVA_IMAGE_TOKENS = 16  # (32 / 8)^2 patches, CLS dropped


def llava_inputs(batch_prompt_lens, seed=0, padding="left"):
    """input_ids with one image (16 placeholder tokens) per row, padded to one width."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_prompt_lens:
        text = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        rows.append(torch.cat([text[:2], torch.full((LLAVA_IMAGE_TOKENS,), IMAGE_TOKEN), text[2:]]))
    return pad_rows(rows, padding) | {"pixel_values": torch.randn(len(rows), 3, 32, 32, generator=g)}


def text_inputs(batch_prompt_lens, seed=0, padding="left"):
    g = torch.Generator().manual_seed(seed)
    return pad_rows([torch.randint(1, IMAGE_TOKEN, (n,), generator=g) for n in batch_prompt_lens], padding)


def pad_rows(rows, padding):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}
