"""The demo VLM: SmolLM2-135M-Instruct (real weights, offline GGUF) as the language model of a
``LlavaForConditionalGeneration`` with a small ViT vision tower and a projector.

Only the vision tower and the projector are trained (``vispec.demo.train_vision``), on
procedurally generated scenes (``vispec.demo.scenes``); the language model stays
frozen. Their weights (a few MB) ship in ``vispec/demo/weights/vision.safetensors``.
"""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights" / "vision.safetensors"
IMAGE_TOKEN = "<image>"
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, image_size=96,
              patch_size=16, projection_dim=192)
# SmolLM2's chat format, with image items in the content lists processors use.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_demo_vlm(vision_weights: Path | str | None = WEIGHTS, dtype=torch.float32):
    """(model, processor). ``vision_weights=None`` (or a missing file) leaves the vision side random."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..testing import smollm2

    lm, tok = smollm2()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    lm.resize_token_embeddings(len(tok))
    with torch.no_grad():
        lm.get_input_embeddings().weight[image_id:] = 0  # a placeholder: replaced by image features, never emitted
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=lm.config,
        image_token_id=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    if vision_weights is not None and Path(vision_weights).is_file():
        from safetensors.torch import load_file

        missing = model.load_state_dict(load_file(str(vision_weights)), strict=False)
        bad = [k for k in missing.missing_keys if not k.startswith(("model.language_model.", "lm_head."))]
        if bad or missing.unexpected_keys:
            raise ValueError(f"{vision_weights} does not fit the demo VLM: missing {bad}, unexpected {missing.unexpected_keys}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": VISION["image_size"]},
                                              crop_size={"height": VISION["image_size"], "width": VISION["image_size"]}),
        tokenizer=tok, patch_size=VISION["patch_size"], vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model.to(dtype).eval(), processor


def vision_state_dict(model) -> dict:
    """The trained part of the demo VLM: vision tower and projector."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def prompt(processor, question: str = "Describe the image.") -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False,
    )
