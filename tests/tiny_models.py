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


VIDEO_TOKEN = 151
VISION_START = 152


def _qwen_text(**over):
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=PAD, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
    )
    cfg.update(over)
    return cfg


def qwen2_vl(seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=2, in_channels=3)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(), image_token_id=IMAGE_TOKEN,
                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def qwen2_5_vl(seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(), image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def qwen3_vl(seed=0):
    """Qwen3-VL: DeepStack (visual features added in both decoder layers) and interleaved M-RoPE."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    text = _qwen_text(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_START + 1, tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


QWEN_GRID = (1, 4, 6)  # t, h, w patches of one 16 x 24 image: 24 patches, 6 tokens after the 2x2 merge
QWEN_IMAGE_TOKENS = 6


def qwen_inputs(batch_prompt_lens, seed=0, padding="left"):
    """One image per row: <vision_start> + 6 image tokens inside the text, with mm_token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for n in batch_prompt_lens:
        text = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        ids = torch.cat([text[:2], torch.tensor([VISION_START]), torch.full((QWEN_IMAGE_TOKENS,), IMAGE_TOKEN), text[2:]])
        rows.append(ids)
        types.append((ids == IMAGE_TOKEN).long())
    out = pad_rows(rows, padding)
    tt = pad_rows(types, padding)["input_ids"]  # padded with 0 (text)
    t, h, w = QWEN_GRID
    patches = t * h * w
    return out | {
        "mm_token_type_ids": tt,
        "pixel_values": torch.randn(len(rows) * patches, 3 * 2 * 4 * 4, generator=g),
        "image_grid_thw": torch.tensor([QWEN_GRID] * len(rows)),
    }


def llava_next(seed=0):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=32,
    )
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text_cfg(), image_token_id=IMAGE_TOKEN,
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


# (height, width) of each row's image and how many tokens LLaVA-NeXT's anyres packing gives it
# (base tile + 2 tiles + row newlines), as the model's own get_image_features reports.
LLAVA_NEXT_SIZES = [(32, 64), (64, 32), (32, 64), (64, 32)]
LLAVA_NEXT_TOKENS = {(32, 64): 52, (64, 32): 56}


def llava_next_inputs(batch_prompt_lens, seed=0, padding="left"):
    g = torch.Generator().manual_seed(seed)
    rows, sizes = [], []
    for i, n in enumerate(batch_prompt_lens):
        size = LLAVA_NEXT_SIZES[i % len(LLAVA_NEXT_SIZES)]
        text = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        rows.append(torch.cat([text[:2], torch.full((LLAVA_NEXT_TOKENS[size],), IMAGE_TOKEN), text[2:]]))
        sizes.append(size)
    return pad_rows(rows, padding) | {
        "pixel_values": torch.randn(len(rows), 3, 3, 32, 32, generator=g),
        "image_sizes": torch.tensor(sizes),
    }


def llava_onevision(seed=0):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    text = {k: v for k, v in _qwen_text().items() if k != "rope_parameters"} | {"model_type": "qwen2"}
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


ONEVISION_VIDEO_TOKENS = 9  # 2 frames pooled to 2 x 2, then one newline


def llava_onevision_inputs(batch_prompt_lens, seed=0, padding="left", videos=True):
    """Rows alternate between an anyres image (as LLaVA-NeXT's) and a 2-frame video (images only without videos)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(batch_prompt_lens):
        text = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        vis = (torch.full((LLAVA_NEXT_TOKENS[LLAVA_NEXT_SIZES[0]],), IMAGE_TOKEN) if i % 2 == 0 or not videos
               else torch.full((ONEVISION_VIDEO_TOKENS,), VIDEO_TOKEN))
        rows.append(torch.cat([text[:2], vis, text[2:]]))
    n_vid = len(rows) // 2 if videos else 0
    n_img = len(rows) - n_vid
    out = pad_rows(rows, padding) | {"pixel_values": torch.randn(n_img, 3, 3, 32, 32, generator=g),
                                     "image_sizes": torch.tensor([LLAVA_NEXT_SIZES[0]] * n_img)}
    if n_vid:
        out["pixel_values_videos"] = torch.randn(n_vid, 2, 3, 32, 32, generator=g)
    return out


def _idefics3_like(config_cls, model_cls, seed):
    torch.manual_seed(seed)
    cfg = config_cls(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8),
                     text_config=_text_cfg().to_dict(), image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=False)
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def idefics3(seed=0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics3_like(Idefics3Config, Idefics3ForConditionalGeneration, seed)


def smolvlm(seed=0):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics3_like(SmolVLMConfig, SmolVLMForConditionalGeneration, seed)


IDEFICS3_IMAGE_TOKENS = 4  # (32 / 8)^2 patches, pixel-shuffled by 2 x 2


def idefics3_inputs(batch_prompt_lens, seed=0, padding="left"):
    """Two image tiles per row (4 tokens each, separated by a text token), with the pixel mask."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_prompt_lens:
        text = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        img = torch.full((IDEFICS3_IMAGE_TOKENS,), IMAGE_TOKEN)
        rows.append(torch.cat([text[:2], img, text[2:3], img, text[3:]]))
    b = len(rows)
    return pad_rows(rows, padding) | {"pixel_values": torch.randn(b, 2, 3, 32, 32, generator=g),
                                      "pixel_attention_mask": torch.ones(b, 2, 32, 32, dtype=torch.long)}


GEMMA3_WINDOW = 32  # small, so that most tests generate past it (the default tree of 31 nodes fits)


def _gemma3_text(**over):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=GEMMA3_WINDOW,
               layer_types=["sliding_attention"] * 3 + ["full_attention"], pad_token_id=PAD, eos_token_id=None,
               bos_token_id=None, tie_word_embeddings=False)
    return cfg | over


def gemma3_text(seed=0, **over):
    """Gemma-3 text: three sliding-window layers, then a global one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_gemma3_text(**over))).eval()
    model.generation_config.pad_token_id = PAD
    return model


BOI, EOI = 152, 153


def gemma3(seed=0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=_gemma3_text(), vision_config=vision, mm_tokens_per_image=4,
                       image_token_index=IMAGE_TOKEN, boi_token_index=BOI, eoi_token_index=EOI, tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def gemma3_inputs(batch_prompt_lens, seed=0, padding="left"):
    """<boi> 4 image tokens <eoi> inside the text, with token_type_ids (1 on image tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_prompt_lens:
        t = torch.randint(1, IMAGE_TOKEN, (n,), generator=g)
        rows.append(torch.cat([t[:2], torch.tensor([BOI]), torch.full((4,), IMAGE_TOKEN), torch.tensor([EOI]), t[2:]]))
    out = pad_rows(rows, padding)
    return out | {"pixel_values": torch.randn(len(rows), 3, 32, 32, generator=g),
                  "token_type_ids": (out["input_ids"] == IMAGE_TOKEN).long()}


def qwen2_text(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in _qwen_text().items() if k != "rope_parameters"}
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def mistral_text(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**_text_cfg().to_dict())).eval()
