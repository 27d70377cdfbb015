"""Drop-in: make an existing ``model.generate(...)`` call speculative with one line.

    handle = vispec.accelerate(model, drafter)   # model.generate(...) now runs vispec
    handle.undo()                                # back to transformers' generate

The model's ``generate`` is shadowed by an instance attribute (the mechanism
transformers itself uses for ``custom_generate`` repositories). Each call merges the
model's generation config with its keyword arguments exactly as ``generate`` does;
greedy and plain sampling (temperature, top-k, top-p, EOS, max_new_tokens /
max_length, streamers) run speculatively, anything else (beam search, repetition
penalty, custom logits processors, output scores, ...) falls back to the original
``generate`` with a warning, never to a different answer.
"""
from __future__ import annotations

import copy
import warnings

from .drafters.base import Drafter, TreeConfig
from .engine import UNSUPPORTED_OPTIONS
from .engine import generate as vispec_generate
from .models import adapter_for

# Generation-config fields vispec honours; any other field that asks for something falls back.
HANDLED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "use_cache", "return_dict_in_generate", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "_commit_hash", "cache_implementation", "generation_kwargs", "compile_config",
}
# What model.generate uses for a field that neither the call, the given config nor the model's config sets
# (transformers 5.x: GenerationConfig fields default to None and these are filled in at generate time).
GENERATE_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "early_stopping": False, "num_beams": 1,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "remove_invalid_values": False, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0, "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10, "target_lookbehind": 10, "num_beam_groups": 1,
    "diversity_penalty": 0.0,
}
_UNSET = (None, False, [], {})  # a field left at any of these asks for nothing


def resolve(model, generation_config, kwargs: dict, prompt_len: int) -> tuple[dict | None, str | None]:
    """Merges a generate call's options as ``model.generate`` does (the call's keywords over the given
    config, over the model's config, over transformers' defaults). Returns (vispec.generate options, None),
    or (None, why vispec cannot run it)."""
    cfg = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    if generation_config is not None:  # fields the given config leaves unset come from the model's
        for k, v in model.generation_config.to_dict().items():
            if getattr(cfg, k, None) is None and v is not None:
                setattr(cfg, k, v)
    unused = cfg.update(**kwargs)
    if unused:
        return None, f"unsupported arguments {sorted(unused)}"
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if k not in HANDLED and v not in _UNSET and (k not in GENERATE_DEFAULTS or v != GENERATE_DEFAULTS[k]))
    if changed:
        return None, f"generation options {changed} are not supported"

    def get(name):
        v = getattr(cfg, name, None)
        return GENERATE_DEFAULTS.get(name) if v is None else v

    if cfg.max_new_tokens is not None:
        max_new = cfg.max_new_tokens
    elif cfg.max_length is not None:
        max_new = cfg.max_length - prompt_len
    else:  # transformers' default: 20 new tokens, within the model's positions
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        max_new = GENERATE_DEFAULTS["max_length"] if limit is None else min(GENERATE_DEFAULTS["max_length"],
                                                                             limit - prompt_len)
    if max_new < 1:
        return None, f"max_length {cfg.max_length} leaves no room after the {prompt_len}-token prompt"
    sample = bool(get("do_sample"))
    top_k, top_p = get("top_k"), get("top_p")
    return dict(
        max_new_tokens=int(max_new),
        temperature=float(get("temperature")) if sample else 0.0,
        top_k=int(top_k) if sample and top_k else None,
        top_p=float(top_p) if sample and top_p is not None and top_p < 1.0 else None,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    ), None


class Accelerated:
    """Handle returned by :func:`accelerate`; ``undo()`` restores exactly what ``model.generate`` was."""

    def __init__(self, model, drafter: Drafter, tree: TreeConfig | None, previous):
        self.model = model
        self.drafter = drafter
        self.tree = tree
        self.previous = previous  # the instance attribute shadowed (None: there was none)
        self.last_stats = None
        self.last_options = None  # the vispec.generate options the last call resolved to
        self.fallbacks = 0

    def undo(self) -> None:
        current = self.model.__dict__.get("generate")
        if current is None or getattr(current, "_vispec", None) is not self:
            return  # already undone, or shadowed again by someone else: leave it
        if self.previous is None:
            del self.model.generate
        else:
            self.model.generate = self.previous

    def _original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).generate(self.model, *args, **kwargs)

    def _fallback(self, reason, args, kwargs):
        self.fallbacks += 1
        warnings.warn(f"vispec: {reason}; falling back to transformers' generate", stacklevel=3)
        return self._original(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        model = self.model
        if args:
            if len(args) > 1:
                return self._fallback("positional generate arguments beyond the inputs", args, kwargs)
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        call = dict(kwargs)  # what a fallback passes on, untouched
        present = [f"{k} ({UNSUPPORTED_OPTIONS[k]})" for k in UNSUPPORTED_OPTIONS if kwargs.get(k) is not None]
        if present:
            return self._fallback(f"{', '.join(present)} is not supported", args, call)
        streamer = kwargs.pop("streamer", None)
        generation_config = kwargs.pop("generation_config", None)
        adapter = adapter_for(model)
        names = {"input_ids", "attention_mask", *adapter.inputs}
        inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if "input_ids" not in inputs:
            return self._fallback("no input_ids given", args, call)
        options, why = resolve(model, generation_config, kwargs, inputs["input_ids"].shape[1])
        if why:
            return self._fallback(why, args, call)
        self.last_options = options
        out = vispec_generate(model, self.drafter, streamer=streamer, tree=self.tree, **options, **inputs)
        self.last_stats = out.stats
        return_dict = kwargs.get("return_dict_in_generate")
        if return_dict is None:
            return_dict = (generation_config or model.generation_config).return_dict_in_generate
        if return_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=out.sequences)
        return out.sequences


def accelerate(model, drafter: Drafter, tree: TreeConfig | None = None) -> Accelerated:
    """Makes ``model.generate`` speculative (see the module docstring); returns a handle with ``undo()``."""
    adapter_for(model)  # unsupported classes fail here, not at the first generate call
    drafter.check_target(model)
    if tree is not None:
        drafter.check_tree(tree)
    existing = model.__dict__.get("generate")
    if existing is not None and getattr(existing, "_vispec", None) is not None:
        existing._vispec.undo()
        existing = model.__dict__.get("generate")
    handle = Accelerated(model, drafter, tree, existing)

    def generate(*args, **kwargs):
        return handle(*args, **kwargs)

    generate._vispec = handle
    generate.__doc__ = "vispec speculative generate (vispec.accelerate); see transformers' generate for arguments."
    model.generate = generate
    return handle
