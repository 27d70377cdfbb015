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
from .engine import generate as vispec_generate
from .models import MULTIMODAL_INPUTS, Target

# Generation-config fields vispec honours; any other field that differs from its default falls back.
HANDLED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "use_cache", "return_dict_in_generate", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "_commit_hash", "cache_implementation", "generation_kwargs", "compile_config",
}
# Explicit generate() arguments that change the decoding: their presence falls back.
UNSUPPORTED_ARGS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
    "negative_prompt_attention_mask", "custom_generate", "synced_gpus", "assistant_tokenizer", "tokenizer",
)


class Accelerated:
    """Handle returned by :func:`accelerate`; ``undo()`` restores the model's own generate."""

    def __init__(self, model, drafter: Drafter, tree: TreeConfig | None):
        self.model = model
        self.drafter = drafter
        self.tree = tree
        self.last_stats = None
        self.fallbacks = 0

    def undo(self) -> None:
        if self.model.__dict__.get("generate") is not None and getattr(self.model.generate, "_vispec", None) is self:
            del self.model.generate

    def _fallback(self, reason, args, kwargs):
        self.fallbacks += 1
        warnings.warn(f"vispec: {reason}; falling back to transformers' generate", stacklevel=3)
        return type(self.model).generate(self.model, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        model = self.model
        if args:
            if len(args) > 1:
                return self._fallback("positional generate arguments beyond the inputs", args, kwargs)
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        call = dict(kwargs)  # what a fallback passes on, untouched
        present = [k for k in UNSUPPORTED_ARGS if kwargs.get(k) is not None]
        if present:
            return self._fallback(f"{', '.join(present)} is not supported", args, call)
        streamer = kwargs.pop("streamer", None)
        gen_cfg = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
        inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("input_ids", "attention_mask") or k in MULTIMODAL_INPUTS}
        unused = gen_cfg.update(**kwargs)
        if unused:
            return self._fallback(f"unsupported arguments {sorted(unused)}", args, call)
        defaults = type(gen_cfg)()
        unset = (None, False, [], {})  # a field left at any of these asks for nothing
        changed = [
            k for k, v in gen_cfg.to_dict().items()
            if k not in HANDLED and v != getattr(defaults, k, None) and not (v in unset and getattr(defaults, k, None) in unset)
        ]
        if changed:
            return self._fallback(f"generation options {sorted(changed)} are not supported", args, call)
        if "input_ids" not in inputs:
            return self._fallback("no input_ids given", args, call)
        prompt_len = inputs["input_ids"].shape[1]
        if gen_cfg.max_new_tokens is not None:
            max_new = gen_cfg.max_new_tokens
        else:
            max_new = gen_cfg.max_length - prompt_len
        if max_new < 1:
            return self._fallback(f"max_length {gen_cfg.max_length} leaves no room after the prompt", args, call)
        greedy = not gen_cfg.do_sample
        out = vispec_generate(
            model,
            self.drafter,
            max_new_tokens=max_new,
            temperature=0.0 if greedy else float(gen_cfg.temperature if gen_cfg.temperature is not None else 1.0),
            top_k=None if greedy or not gen_cfg.top_k else int(gen_cfg.top_k),
            top_p=None if greedy or gen_cfg.top_p is None or gen_cfg.top_p >= 1.0 else float(gen_cfg.top_p),
            eos_token_id=gen_cfg.eos_token_id,
            pad_token_id=gen_cfg.pad_token_id,
            streamer=streamer,
            tree=self.tree,
            **inputs,
        )
        self.last_stats = out.stats
        if gen_cfg.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=out.sequences)
        return out.sequences


def accelerate(model, drafter: Drafter, tree: TreeConfig | None = None) -> Accelerated:
    """Makes ``model.generate`` speculative (see the module docstring); returns a handle with ``undo()``."""
    Target.wrap(model)  # unsupported classes fail here, not at the first generate call
    drafter.check_target(model)
    existing = model.__dict__.get("generate")
    if existing is not None and getattr(existing, "_vispec", None) is not None:
        existing._vispec.undo()
    handle = Accelerated(model, drafter, tree)

    def generate(*args, **kwargs):
        return handle(*args, **kwargs)

    generate._vispec = handle
    generate.__doc__ = "vispec speculative generate (vispec.accelerate); see transformers' generate for arguments."
    model.generate = generate
    return handle
