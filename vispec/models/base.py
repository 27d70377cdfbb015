"""The adapter interface: everything the engine, data generation and training need to know about a
target model family, behind one object. Adapters use only the models' public pieces (``model.model``,
``model.lm_head``, the input embeddings, ``set_attn_implementation``, forward pre-hooks); no modeling
file is copied or patched.

Adding a family = one module in this package with an ``Adapter`` subclass decorated by
:func:`register` (and a tiny test config in ``tests/tiny_models.py``).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..attention import register as register_attention

_REGISTRY: dict[str, type["Adapter"]] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: ``cls`` serves the model classes named in ``cls.classes``."""
    for name in cls.classes:
        if name in _REGISTRY:
            raise ValueError(f"{name} already has an adapter ({_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
    return cls


def supported_classes() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model) -> "Adapter":
    """The adapter of ``model``'s family (subclasses of a supported class are served too)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__](model)
    raise TypeError(
        f"vispec does not support {type(model).__name__}; supported target classes: {', '.join(supported_classes())}"
    )


@dataclass
class Prefill:
    """What the target's prefill forward produced, in the left-padded layout it ran in."""

    hidden: torch.Tensor  # (B, P, H) last hidden states (after the final norm)
    inputs_embeds: torch.Tensor  # (B, P, H) input embeddings the language model saw (image features merged)
    state: Any = None  # per-request family state the tree forwards need (e.g. Qwen-VL's rope deltas)


def gather_positions(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states (B, T, H), index (B, K) -> (B, K, H): the rows at those positions, on states' device."""
    idx = index.to(states.device).unsqueeze(-1).expand(-1, -1, states.shape[-1])
    return torch.gather(states, 1, idx)


class LayerCapture:
    """What :meth:`Adapter.capture_layers` recorded in the latest forward."""

    def __init__(self, n: int):
        self.states: list[torch.Tensor | None] = [None] * n

    def features(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The captured states concatenated (B, T, n * H) on the last one's device; ``index`` (B, K): only
        those positions, gathered from each state before concatenating (a step keeps its accepted nodes)."""
        if any(t is None for t in self.states):
            raise RuntimeError("a captured decoder layer did not run in the forward")
        dev = self.states[-1].device
        # gathered where each state lives, so only the kept rows cross devices
        return torch.cat([(t if index is None else gather_positions(t, index)).to(dev) for t in self.states], -1)


class Adapter:
    """Base adapter: a decoder-only text LM (``model.model`` + ``model.lm_head``)."""

    classes: ClassVar[tuple[str, ...]] = ()
    # Processor outputs besides input_ids / attention_mask that the prefill forwards as they are.
    inputs: ClassVar[frozenset[str]] = frozenset()
    # Of those, the per-token ones (B, P): they move with the tokens when padding is rearranged.
    token_inputs: ClassVar[frozenset[str]] = frozenset()
    # The key of ``set_attn_implementation`` that reaches the language model ("" = the whole model).
    attn_key: ClassVar[str] = ""

    def __init__(self, model):
        self.model = model

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def base(self):
        """The base model: returns the last hidden state after the final norm."""
        return self.model.model

    @property
    def language_model(self):
        return self.base

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def cache_arg(self) -> str:
        """The name the installed transformers gives the cache argument (``cache`` from 5.24 on)."""
        params = inspect.signature(type(self.base).forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def image_token_ids(self) -> list[int]:
        """Token ids of image / video placeholders (none for a text LM)."""
        return []

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's next-token logits from last hidden states, as its own forward computes them."""
        logits = self.lm_head(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def check_model(self, tree) -> None:
        """Raises ValueError if tree attention cannot reproduce this model's attention for ``tree``."""
        tc = self.text_config
        if getattr(tc, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{type(self.model).__name__} caps attention logits (attn_logit_softcapping), which "
                             "vispec's tree attention does not implement")
        window = getattr(tc, "sliding_window", None)
        if window and tree.num_nodes > window:
            raise ValueError(f"the tree's {tree.num_nodes} nodes do not fit the model's sliding window ({window})")

    # -- requests -----------------------------------------------------------------------------------
    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict) -> None:
        """Raises ValueError naming the problem with a request's model inputs (before any forward)."""
        unknown = sorted(k for k in inputs if k not in self.inputs)
        if unknown:
            takes = (f"it takes {', '.join(sorted(self.inputs))} besides input_ids and attention_mask" if self.inputs
                     else "a text-only model")
            raise ValueError(f"vispec.generate got unexpected inputs: {', '.join(unknown)} "
                             f"({type(self.model).__name__}: {takes})")

    def frame_tokens(self, input_ids, image_mask, inputs) -> list[list[int]] | None:
        """Per row, per visual block, the tokens of one frame (None: each block is one frame)."""
        return None

    # -- forwards -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tree_attention(self):
        """Routes the language model's attention through vispec's function; restores the previous one after."""
        name = register_attention()
        previous = self.text_config._attn_implementation
        if previous == name:
            yield
            return
        self.model.set_attn_implementation({self.attn_key: name} if self.attn_key else name)
        try:
            yield
        finally:
            self.model.set_attn_implementation({self.attn_key: previous} if self.attn_key else previous)

    @contextlib.contextmanager
    def capture_input_embeds(self):
        """Records the first input embeddings the language model receives (image features merged)."""
        box = {}

        def hook(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None and "inputs_embeds" not in box:
                box["inputs_embeds"] = emb

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield box
        finally:
            handle.remove()

    @property
    def decoder_layers(self):
        return self.language_model.layers

    @contextlib.contextmanager
    def capture_layers(self, layers: list[int] | None):
        """Records, for each forward inside, the hidden states entering the decoder layers ``layers``
        (transformers' ``hidden_states[i]``): ``box.features()`` is their concatenation (B, T, len * H) on
        the last one's device. Only those layers' inputs are kept (forward pre-hooks, no extra forward,
        no full hidden-state stack). ``layers=None`` records nothing and yields None."""
        if not layers:
            yield None
            return
        box = LayerCapture(len(layers))
        mods = self.decoder_layers
        handles = []
        for slot, i in enumerate(layers):
            def hook(module, args, kwargs, slot=slot):
                box.states[slot] = args[0] if args else kwargs["hidden_states"]
            handles.append(mods[i].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield box
        finally:
            for hd in handles:
                hd.remove()

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, Any]:
        """(position ids of a padded sequence as ``model.generate`` makes them, per-request state for
        :meth:`tree_positions`). Used for the prompt and, in data generation, for prompt + answer."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0), None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict, cache) -> Prefill:
        """The prompt's forward (left-padded) into ``cache``; call inside :meth:`tree_attention`."""
        pos, state = self.positions(input_ids, attention_mask, inputs)
        with self.capture_input_embeds() as box:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                            **{self.cache_arg: cache}, **inputs)
        embeds = box.get("inputs_embeds")
        if embeds is None:
            embeds = self.embed(input_ids)
        return Prefill(out.last_hidden_state, embeds, state)

    def tree_positions(self, state: Any, lens: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Positions of tree nodes: each row's committed length plus the node's depth."""
        return lens.unsqueeze(1) + depth  # (B, N)

    def tree_forward(self, state: Any, tokens: torch.Tensor, positions: torch.Tensor, cache, tree_step) -> torch.Tensor:
        """Hidden states (B, N, H) of a tree verification forward (tree attention over ``cache``)."""
        return self.base(inputs_embeds=self.embed(tokens), position_ids=positions, use_cache=True,
                         vispec_tree=tree_step, **{self.cache_arg: cache}).last_hidden_state
