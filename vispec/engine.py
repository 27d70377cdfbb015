"""Lossless tree speculative decoding over an unmodified Hugging Face model.

``generate`` = validate the whole request -> prefill -> ``while not done: step()`` -> sequences.
One step, for all batch rows at once (see :meth:`Decoding.step`):

    tree   = drafter.propose(cfg)                      # root = last accepted token
    hidden = target(tree tokens, tree attention)       # ONE forward over all N nodes
    path   = sampler.verify(lm_head(hidden))           # longest valid path + bonus token
    cache.compact_(path)                               # accepted K/V become contiguous
    drafter.extend(accepted tokens, their features)

Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled output
follows the target's (temperature / top-k / top-p processed) distribution.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from . import ops
from .attention import TreeStep
from .cache import TreeCache
from .drafters.base import Drafter, DraftTree, PrefillInputs, TreeConfig
from .linear import few_row_linears
from .models import Adapter, adapter_for
from .models.base import gather_positions
from .sampler import Sampler
from .seq import eos_list, left_align, to_left_padding


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call.

    ``tau`` is the mean number of accepted DRAFT tokens per target forward, averaged over
    the rows still generating at that forward (the bonus token is not counted: add 1 for
    EAGLE's convention of tokens per forward).
    """

    target_forwards: int = 0  # tree-verification forwards (the prefill not counted)
    accepted_draft_tokens: int = 0  # summed over rows
    row_steps: int = 0  # sum over forwards of the rows still generating
    new_tokens: int = 0  # summed over rows
    accept_len_hist: list = field(default_factory=list)  # count of steps per accepted length
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    time_total: float = 0.0

    @property
    def tau(self) -> float:
        return self.accepted_draft_tokens / max(self.row_steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def record(self, accepted: list[int], active: list[bool]) -> None:
        """One verification forward: ``accepted[r]`` draft tokens of each row still generating."""
        self.target_forwards += 1
        for a, live in zip(accepted, active):
            if live:
                self.accepted_draft_tokens += a
                self.row_steps += 1
                self.accept_len_hist.extend([0] * (a + 1 - len(self.accept_len_hist)))
                self.accept_len_hist[a] += 1

    def __str__(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.time_total:.3f}s ({self.tokens_per_second:.1f} tok/s), "
            f"{self.target_forwards} target forwards, tau={self.tau:.2f} accepted drafts/forward (+1 bonus); "
            f"prefill {self.time_prefill:.3f}s, draft {self.time_draft:.3f}s, verify {self.time_verify:.3f}s, "
            f"other {self.time_other:.3f}s"
        )


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, P + T): prompt as given, then the new tokens, pad after a row ends
    stats: GenerationStats


# Options of model.generate that vispec does not implement (vispec.generate refuses them;
# vispec.accelerate hands such calls back to transformers' generate). The one list of them.
UNSUPPORTED_OPTIONS = {
    "num_beams": "beam search",
    "num_beam_groups": "group beam search",
    "penalty_alpha": "contrastive search",
    "num_return_sequences": "several sequences per prompt",
    "repetition_penalty": "repetition penalty",
    "no_repeat_ngram_size": "n-gram blocking",
    "bad_words_ids": "bad-word filtering",
    "logits_processor": "custom logits processors",
    "stopping_criteria": "custom stopping criteria",
    "prefix_allowed_tokens_fn": "constrained decoding",
    "min_p": "min-p sampling",
    "typical_p": "typical sampling",
    "assistant_model": "assisted generation",
    "assistant_tokenizer": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "custom_generate": "a custom decoding loop",
    "synced_gpus": "synced GPUs (DeepSpeed ZeRO-3)",
    "tokenizer": "stop strings",
}


class Clock:
    """Splits wall time into the stats' phases; synchronises the device only when profiling."""

    def __init__(self, stats: GenerationStats, device: torch.device, profile: bool):
        self.stats, self.sync = stats, profile and device.type == "cuda"
        self.device = device
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        setattr(self.stats, f"time_{phase}", getattr(self.stats, f"time_{phase}") + now - self.t)
        self.t = now


class Emitter:
    """Owns what the caller sees: EOS, ``max_new_tokens``, the streamer, and the padded result."""

    def __init__(self, batch: int, eos: list[int], max_new_tokens: int, streamer, device):
        self.tokens = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.eos, self.max_new, self.streamer = set(eos), max_new_tokens, streamer
        self.done_t = torch.zeros(batch, dtype=torch.bool, device=device)

    def push(self, rows: list[list[int]]) -> None:
        """Appends each unfinished row's tokens, stopping at EOS or after max_new_tokens."""
        before = len(self.tokens[0])
        finished = sum(self.done)
        for r, toks in enumerate(rows):
            if self.done[r]:
                continue
            for t in toks:
                self.tokens[r].append(t)
                if t in self.eos or len(self.tokens[r]) >= self.max_new:
                    self.done[r] = True
                    break
        if self.streamer is not None and len(self.tokens[0]) > before:
            self.streamer.put(torch.tensor(self.tokens[0][before:], dtype=torch.long))
        if sum(self.done) != finished:  # a host-to-device copy (a sync on CUDA) only when a row finishes
            self.done_t = torch.tensor(self.done, device=self.done_t.device)

    @property
    def finished(self) -> bool:
        return all(self.done)

    def sequences(self, prompt: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        if self.streamer is not None:
            self.streamer.end()
        width = max(len(t) for t in self.tokens)
        gen = torch.full((len(self.tokens), width), pad_token_id, dtype=prompt.dtype)
        for r, toks in enumerate(self.tokens):
            gen[r, : len(toks)] = torch.tensor(toks, dtype=prompt.dtype)
        return torch.cat([prompt, gen.to(prompt.device)], 1)


@dataclass
class Decoding:
    """One request's decoding state after the prefill; :meth:`step` is one speculative step."""

    adapter: Adapter
    drafter: Drafter
    sampler: Sampler
    tree: TreeConfig
    cache: TreeCache
    state: object  # the adapter's per-request state (Prefill.state)
    forward: object = None  # the tree forward: adapter.tree_forward, or its torch.compile'd version

    def step(self, done: torch.Tensor, clock: Clock) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts, verifies and commits one tree per row. Returns (tokens (B, depth + 1): the accepted
        drafts then the bonus token, accepted draft count (B,)); finished rows (``done``) accept nothing."""
        dt = self.drafter.propose(self.tree)
        n = dt.tokens.shape[1]
        if n > self.tree.num_nodes:
            raise ValueError(f"the drafter proposed {n} nodes, more than tree.total_tokens + 1 = {self.tree.num_nodes}")
        mask = ops.pack_tree_mask(ops.tree_mask_from_parents(dt.parents))
        pos = self.adapter.tree_positions(self.state, self.cache.lens, dt.depth)
        clock.lap("draft")
        forward = self.forward or self.adapter.tree_forward
        with self.adapter.capture_layers(getattr(self.drafter, "feature_layers", None)) as cap:
            h = forward(self.state, dt.tokens, pos, self.cache, TreeStep(self.cache.lens, mask))
        logits = self.adapter.logits(h)  # (B, N, V): on the head's device (a model spread over devices)
        on = logits.device
        verified = self.sampler.verify(logits, DraftTree(dt.tokens.to(on), dt.parents.to(on), dt.depth),
                                       min(self.tree.depth, n - 1))
        path, alen, bonus = (t.to(done.device) for t in verified)
        alen = alen.masked_fill(done, 0)  # finished rows keep their cache length
        self.cache.compact_(path, alen, active=~done)
        clock.lap("verify")
        # Accepted tokens then the bonus, per row: the first alen + 1 are valid.
        acc = torch.gather(dt.tokens, 1, path[:, 1:].clamp(min=0))
        out = torch.cat([acc, acc[:, :1]], 1).scatter_(1, alen.unsqueeze(1), bonus.unsqueeze(1))
        # What the drafter reads at the accepted nodes (the last hidden state, or EAGLE-3's captured layers);
        # only those rows are gathered and move to the drafter's device.
        keep = path.clamp(min=0)
        feats = (gather_positions(h, keep) if cap is None else cap.features(keep)).to(done.device)
        self.drafter.extend(out, feats, torch.where(done, 0, alen + 1))
        return out, alen


@dataclass
class Request:
    """A validated request: the prompt left-padded, the model inputs, and how to sample and stop."""

    input_ids: torch.Tensor  # (B, P) as given (returned in front of the new tokens)
    lp_ids: torch.Tensor  # (B, P) left-padded
    lp_mask: torch.Tensor
    model_inputs: dict
    sampler: Sampler
    tree: TreeConfig
    eos: list[int]
    pad_token_id: int
    max_new_tokens: int
    streamer: object


@torch.inference_mode()
def generate(
    model,
    drafter: Drafter,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id=None,
    pad_token_id: int | None = None,
    streamer=None,
    tree: TreeConfig | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    profile: bool = False,
    compile: bool | str = False,
    **inputs,
) -> GenerateOutput:
    """Speculative generation; ``**inputs`` is what the model's processor (or tokenizer) returns.

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled from the target's
    distribution after temperature, ``top_k`` and ``top_p`` (None disables each), as
    ``model.generate(do_sample=True, ...)`` does. ``eos_token_id`` / ``pad_token_id``
    default to the model's generation config. Every problem with the request is reported
    before the first forward. ``profile=True`` synchronises the GPU between phases so that
    the stats' time split is exact (without it, only the total is). ``compile=True`` runs the
    tree-verification forward under ``torch.compile`` (a mode name such as ``"reduce-overhead"``,
    CUDA graphs on a GPU, selects that mode); the first steps pay the compilation, later calls
    on the same model reuse it. The prefill stays eager (its length changes with every prompt).
    """
    t_start = time.perf_counter()
    adapter = adapter_for(model)
    req = _validate(adapter, drafter, inputs, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                    pad_token_id, streamer, tree, seed, generator)
    forward = compiled_tree_forward(adapter, compile)
    stats = GenerationStats()
    b, p = req.lp_ids.shape
    device = req.lp_ids.device
    clock = Clock(stats, device, profile)
    cache = TreeCache(adapter.num_layers, b, p + req.max_new_tokens + req.tree.num_nodes + 1, device)
    layers = getattr(drafter, "feature_layers", None)
    # Eager forwards run their few-row linear layers on vispec's CPU kernel (a compiled one keeps what it traced).
    linears = contextlib.nullcontext() if compile else few_row_linears(model, drafter)
    with adapter.tree_attention(), linears:
        with adapter.capture_layers(layers) as cap:
            pre = adapter.prefill(req.lp_ids, req.lp_mask, req.model_inputs, cache)
        features = pre.hidden if cap is None else cap.features()
        first = req.sampler.first(adapter.logits(pre.hidden[:, -1])).to(device)
        lengths = req.lp_mask.sum(1)
        pad_left = p - lengths
        cache.unpad_(p, pad_left)
        image_ids = adapter.image_token_ids()
        image_mask = torch.isin(req.lp_ids, torch.tensor(image_ids, device=device)) if image_ids else None
        drafter.begin(b, cache.max_len, device, req.tree)
        drafter.prefill(PrefillInputs(
            input_ids=left_align(req.lp_ids, pad_left),
            inputs_embeds=left_align(pre.inputs_embeds.to(device), pad_left),
            features=left_align(features.to(device), pad_left),
            lengths=lengths,
            next_tokens=first,
            image_mask=None if image_mask is None else left_align(image_mask, pad_left),
            frame_tokens=None if image_mask is None else adapter.frame_tokens(req.lp_ids, image_mask, req.model_inputs),
        ))
        clock.lap("prefill")
        emitter = Emitter(b, req.eos, req.max_new_tokens, streamer, device)
        if streamer is not None:
            streamer.put(req.input_ids.cpu())
        emitter.push([[t] for t in first.tolist()])
        dec = Decoding(adapter, drafter, req.sampler, req.tree, cache, pre.state, forward)
        while not emitter.finished:
            tokens, alen = dec.step(emitter.done_t, clock)
            rows = torch.cat([tokens, alen.unsqueeze(1)], 1).tolist()  # the step's one host read
            active = [not d for d in emitter.done]
            stats.record([r[-1] for r in rows], active)
            emitter.push([r[: r[-1] + 1] for r in rows])
            clock.lap("other")
    stats.new_tokens = sum(len(t) for t in emitter.tokens)
    sequences = emitter.sequences(req.input_ids, req.pad_token_id)
    stats.time_total = time.perf_counter() - t_start
    return GenerateOutput(sequences=sequences, stats=stats)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiled_tree_forward(adapter: Adapter, mode: bool | str):
    """``adapter.tree_forward`` under ``torch.compile`` (None: eager). Dynamo keeps its compiled code on the
    function's code object, guarded on the model it saw, so later requests on the same model reuse it."""
    if mode is False or mode is None:
        return None
    if mode is True:
        mode = "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return torch.compile(adapter.tree_forward, mode=mode, dynamic=None)


def _validate(adapter: Adapter, drafter, inputs, max_new_tokens, temperature, top_k, top_p, eos_token_id,
              pad_token_id, streamer, tree, seed, generator) -> Request:
    """Every check of a request, before any forward: a ValueError names the argument at fault."""
    bad = [k for k in inputs if k in UNSUPPORTED_OPTIONS]
    if bad:
        raise ValueError(
            f"vispec.generate does not support {', '.join(f'{k} ({UNSUPPORTED_OPTIONS[k]})' for k in bad)}; "
            "use model.generate for that"
        )
    input_ids = inputs.pop("input_ids", None)
    attention_mask = inputs.pop("attention_mask", None)
    if input_ids is None:
        raise ValueError("vispec.generate needs input_ids (pass what the processor returns)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    b, p = input_ids.shape
    if b == 0 or p == 0:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} is empty: give at least one prompt token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    sampler = Sampler.create(temperature, top_k, top_p, seed=seed, generator=generator, device=input_ids.device)
    tree = TreeConfig() if tree is None else tree
    if not isinstance(tree, TreeConfig):
        raise ValueError(f"tree must be a vispec.TreeConfig, got {type(tree).__name__}")
    model = adapter.model
    drafter.check_target(model)
    drafter.check_tree(tree)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    emb = model.get_input_embeddings().weight
    if input_ids.device != emb.device:
        raise ValueError(f"input_ids are on {input_ids.device}, the model's embeddings on {emb.device}")
    vocab = emb.shape[0]
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids hold a token outside the model's vocabulary [0, {vocab})")
    model_inputs = {k: v for k, v in inputs.items() if v is not None}
    adapter.check_inputs(input_ids, attention_mask, model_inputs)
    if adapter.max_positions is not None and p + max_new_tokens > adapter.max_positions:
        raise ValueError(
            f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({adapter.max_positions})"
        )
    adapter.check_model(tree)
    gen_cfg = getattr(model, "generation_config", None)
    eos = eos_list(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if streamer is not None and b != 1:
        raise ValueError("streamers support batch size 1 only (as in transformers)")
    seq = {"input_ids": input_ids, **{k: v for k, v in model_inputs.items() if k in adapter.token_inputs}}
    lp_mask, aligned = to_left_padding(attention_mask, seq)
    model_inputs.update({k: v for k, v in aligned.items() if k != "input_ids"})
    return Request(input_ids, aligned["input_ids"], lp_mask, model_inputs, sampler, tree, eos, pad_token_id,
                   max_new_tokens, streamer)
