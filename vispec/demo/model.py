"""The demo VLM: SmolLM2-135M-Instruct (real weights, offline GGUF) as the language model of a
``LlavaForConditionalGeneration`` with a small ViT vision tower and a projector.

Only the vision tower and the projector are trained (``vispec.demo.train_vision``), on
procedurally generated scenes (``vispec.demo.scenes``); the language model stays
frozen. Their weights (a few MB) ship in ``vispec/demo/weights/``: ``vision-576.safetensors`` for the demo's
default, LLaVA-1.5's 576 image tokens per image, ``vision.safetensors`` for the first demo's 36.
"""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_TOKEN = "<image>"
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, projection_dim=192)
# Image tokens per image -> (image size, patch size) of the vision tower. 576 is LLaVA-1.5's geometry
# (336-pixel images, 14-pixel patches), the regime ViSpec was designed for; 36 was the first demo's.
GEOMETRY = {36: (96, 16), 144: (168, 14), 576: (336, 14)}
DEFAULT_IMAGE_TOKENS = 576  # the model of `vispec demo` and the default of every demo script


def vision_weights_path(image_tokens: int) -> Path:
    """Where the vision weights of the demo VLM with ``image_tokens`` image tokens live in the package."""
    check_image_tokens(image_tokens)
    return WEIGHTS_DIR / ("vision.safetensors" if image_tokens == 36 else f"vision-{image_tokens}.safetensors")


def check_image_tokens(image_tokens) -> int:
    if image_tokens not in GEOMETRY:
        raise ValueError(f"the demo VLM has {', '.join(map(str, GEOMETRY))} image tokens per image, not {image_tokens!r}")
    return image_tokens


def weights_metadata(path: Path | str) -> dict:
    """A vision weights file's metadata: ``image_tokens`` (36 if absent), ``complete`` ("1" once every
    training stage has finished; absent in a file saved mid-run)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def weights_image_tokens(path: Path | str) -> int:
    """The image-token count a vision weights file was trained for."""
    return check_image_tokens(int(weights_metadata(path).get("image_tokens", 36)))


WEIGHTS = vision_weights_path(DEFAULT_IMAGE_TOKENS)
# SmolLM2's chat format, with image items in the content lists processors use.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_demo_vlm(vision_weights: Path | str | None = "package", dtype=torch.float32, image_tokens: int | None = None):
    """(model, processor): by default the demo VLM with ``DEFAULT_IMAGE_TOKENS`` image tokens and the package's
    trained vision side. ``vision_weights``: ``"package"`` (the package's file for ``image_tokens``), a file, or
    ``None`` (or a missing file) for a random vision side.

    The vision tower's geometry comes from the weights file; ``image_tokens`` chooses it for a random
    vision side (and must agree with the file when both are given)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from ..testing import clip_image_processor, smollm2

    if vision_weights == "package":
        vision_weights = vision_weights_path(DEFAULT_IMAGE_TOKENS if image_tokens is None else image_tokens)
    have = vision_weights is not None and Path(vision_weights).is_file()
    if have:
        stored = weights_image_tokens(vision_weights)
        if image_tokens is not None and check_image_tokens(image_tokens) != stored:
            raise ValueError(f"{vision_weights} holds vision weights for {stored} image tokens, not {image_tokens}")
        image_tokens = stored
    image_tokens = check_image_tokens(DEFAULT_IMAGE_TOKENS if image_tokens is None else image_tokens)
    size, patch = GEOMETRY[image_tokens]
    lm, tok = smollm2()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    lm.resize_token_embeddings(len(tok))
    with torch.no_grad():
        lm.get_input_embeddings().weight[image_id:] = 0  # a placeholder: replaced by image features, never emitted
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=size, patch_size=patch),
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
    if have:
        from safetensors.torch import load_file

        missing = model.load_state_dict(load_file(str(vision_weights)), strict=False)
        bad = [k for k in missing.missing_keys if not k.startswith(("model.language_model.", "lm_head."))]
        if bad or missing.unexpected_keys:
            raise ValueError(f"{vision_weights} does not fit the demo VLM: missing {bad}, unexpected {missing.unexpected_keys}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=clip_image_processor(size),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model.to(dtype).eval(), processor


def image_tokens_of(model) -> int:
    """Image tokens per image of a demo VLM (from its vision tower's geometry)."""
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def scene_size(model) -> int:
    """The pixel size scenes are drawn at for this demo VLM: its vision tower's input size (the
    processor then only normalises; an upsampled small drawing would blur outlines across patches)."""
    return model.config.vision_config.image_size


def vision_state_dict(model) -> dict:
    """The trained part of the demo VLM: vision tower and projector."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def prompt(processor, question: str = "Describe the image.") -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False,
    )
