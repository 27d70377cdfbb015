"""Lossless tree speculative decoding over an unmodified Hugging Face model.

One step, per batch row (all rows at once, no host sync per tree node):

    tree   = drafter.propose(cfg)                      # root = last accepted token
    hidden = target(tree tokens, tree attention)       # ONE forward over all N nodes
    path   = verify(lm_head(hidden))                   # longest valid path + bonus token
    cache.compact_(path)                               # accepted K/V become contiguous
    drafter.extend(accepted tokens, their features)

Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled
output follows the target's (temperature / top-k / top-p processed) distribution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import ops
from .attention import TreeStep
from .cache import TreeCache
from .drafters.base import Drafter, PrefillInputs, TreeConfig
from .models import MULTIMODAL_INPUTS, Target


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


UNSUPPORTED_OPTIONS = {
    "num_beams": "beam search",
    "num_beam_groups": "group beam search",
    "penalty_alpha": "contrastive search",
    "num_return_sequences": "several sequences per prompt",
    "repetition_penalty": "repetition penalty",
    "no_repeat_ngram_size": "n-gram blocking",
    "bad_words_ids": "bad-word filtering",
    "logits_processor": "custom logits processors",
    "min_p": "min-p sampling",
    "typical_p": "typical sampling",
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding",
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    if isinstance(eos_token_id, torch.Tensor):
        return [int(x) for x in eos_token_id.flatten().tolist()]
    return [int(x) for x in eos_token_id]


def _left_align(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of x (B, P, ...) shifted left by shift[b] (the freed tail holds junk)."""
    b, p = x.shape[:2]
    idx = (torch.arange(p, device=x.device).unsqueeze(0) + shift.unsqueeze(1)).clamp(max=p - 1)
    idx = idx.view(b, p, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


def _to_left_padding(attention_mask: torch.Tensor, tensors: dict) -> tuple[torch.Tensor, dict]:
    """Right- or mixed-padded prompts become left-padded (each row's tokens moved as one block)."""
    b, p = attention_mask.shape
    m = attention_mask.bool()
    n = m.sum(1)
    if bool((n == 0).any()):
        raise ValueError(f"row {int((n == 0).nonzero()[0])} of attention_mask holds no token")
    first = torch.argmax(m.int(), 1)
    last = p - 1 - torch.argmax(m.flip(1).int(), 1)
    if bool((last - first + 1 != n).any()):
        raise ValueError("attention_mask must mark one contiguous block of real tokens per row (padding on the sides)")
    # New column j takes old column j + first - (P - n): the block ends at column P-1.
    idx = (torch.arange(p, device=n.device).unsqueeze(0) + (first - (p - n)).unsqueeze(1)) % p
    out = {k: torch.gather(v, 1, idx.view(b, p, *([1] * (v.dim() - 2))).expand_as(v)) for k, v in tensors.items()}
    new_mask = (torch.arange(p, device=n.device).unsqueeze(0) >= (p - n).unsqueeze(1)).to(attention_mask.dtype)
    return new_mask, out


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
    **inputs,
) -> GenerateOutput:
    """Speculative generation; ``**inputs`` is what the model's processor (or tokenizer) returns.

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled from the target's
    distribution after temperature, ``top_k`` and ``top_p`` (None disables each), as
    ``model.generate(do_sample=True, ...)`` does. ``eos_token_id`` / ``pad_token_id``
    default to the model's generation config.
    """
    t_start = time.perf_counter()
    tree = tree or TreeConfig()
    target = Target.wrap(model)
    # ---- validation: every problem named before any work -------------------------------------
    bad = [k for k in inputs if k in UNSUPPORTED_OPTIONS]
    if bad:
        raise ValueError(
            f"vispec.generate does not support {', '.join(f'{k} ({UNSUPPORTED_OPTIONS[k]})' for k in bad)}; "
            "use model.generate for that"
        )
    unknown = [k for k in inputs if k not in ("input_ids", "attention_mask") and k not in MULTIMODAL_INPUTS]
    if unknown:
        raise ValueError(f"vispec.generate got unexpected inputs: {', '.join(sorted(unknown))}")
    if "input_ids" not in inputs:
        raise ValueError("vispec.generate needs input_ids (pass what the processor returns)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    drafter.check_target(model)
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    device = input_ids.device
    b, p = input_ids.shape
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids hold a token outside the model's vocabulary [0, {vocab})")
    _check_images(target, input_ids, attention_mask, inputs)
    max_len = p + max_new_tokens + tree.num_nodes + 1
    if target.max_positions is not None and p + max_new_tokens > target.max_positions:
        raise ValueError(
            f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({target.max_positions})"
        )
    tc = target.text_config
    window = getattr(tc, "sliding_window", None)
    if window and getattr(tc, "use_sliding_window", True) and p + max_new_tokens > window:
        raise ValueError(
            f"prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's sliding window ({window}); "
            "vispec's tree attention does not implement sliding-window attention"
        )
    gen_cfg = getattr(model, "generation_config", None)
    eos = _eos_list(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    if streamer is not None and b != 1:
        raise ValueError("streamers support batch size 1 only (as in transformers)")
    greedy = temperature == 0.0
    if not greedy and generator is None:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()

    stats = GenerationStats()
    model_inputs = {k: v for k, v in inputs.items() if k in MULTIMODAL_INPUTS}
    # ---- prefill (left padding, as model.generate expects) ---------------------------------------
    seq_tensors = {"input_ids": input_ids}
    if "mm_token_type_ids" in model_inputs:
        seq_tensors["mm_token_type_ids"] = model_inputs["mm_token_type_ids"]
    lp_mask, aligned = _to_left_padding(attention_mask, seq_tensors)
    lp_ids = aligned["input_ids"]
    model_inputs.update({k: v for k, v in aligned.items() if k != "input_ids"})
    cache = TreeCache(target.num_layers, b, max_len, device)
    with target.tree_attention():
        t0 = time.perf_counter()
        with target.capture_input_embeds() as box:
            pos = target.prefill_positions(lp_mask, model_inputs)
            kw = {"position_ids": pos} if pos is not None else {}
            out = target.base(
                input_ids=lp_ids, attention_mask=lp_mask, past_key_values=cache, use_cache=True, **kw, **model_inputs
            )
        hidden = out.last_hidden_state  # (B, P, H)
        target.after_prefill(model_inputs, b, device)
        embeds = box.get("inputs_embeds")
        if embeds is None:
            embeds = target.embed(lp_ids)
        first = _pick(target.lm_head(hidden[:, -1]).unsqueeze(1), greedy, temperature, top_k, top_p, generator)
        lengths = lp_mask.sum(1)
        pad_left = p - lengths
        cache.unpad_(p, pad_left)
        image_ids = target.image_token_ids()
        image_mask = torch.isin(lp_ids, torch.tensor(image_ids, device=device)) if image_ids else None
        drafter.begin(b, max_len + tree.top_k * tree.depth, device)  # room for the draft tree's slots
        drafter.prefill(
            PrefillInputs(
                input_ids=_left_align(lp_ids, pad_left),
                inputs_embeds=_left_align(embeds, pad_left),
                features=_left_align(hidden, pad_left),
                lengths=lengths,
                next_tokens=first,
                image_mask=None if image_mask is None else _left_align(image_mask, pad_left),
                frame_tokens=None if image_mask is None else target.frame_tokens(lp_ids, image_mask, model_inputs),
            )
        )
        _sync(device)
        stats.time_prefill = time.perf_counter() - t0

        # ---- decode --------------------------------------------------------------------------------
        new_tokens = [[] for _ in range(b)]
        done = [False] * b
        _emit(new_tokens, done, [[t] for t in first.tolist()], [1] * b, eos, max_new_tokens)
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.put(first.cpu())
        done_t = torch.tensor(done, device=device)
        max_accept = tree.depth
        while not all(done):
            t0 = time.perf_counter()
            dt = drafter.propose(tree)
            if dt.tokens.shape[1] > tree.num_nodes:
                raise ValueError(
                    f"the drafter proposed {dt.tokens.shape[1]} nodes, more than tree.total_tokens + 1 = {tree.num_nodes}"
                )
            mask = ops.pack_tree_mask(ops.tree_mask_from_parents(dt.parents))
            pos = target.tree_positions(cache.lens, dt.depth)
            _sync(device)
            t1 = time.perf_counter()
            h = target.base(
                inputs_embeds=target.embed(dt.tokens),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                vispec_tree=TreeStep(cache.lens, mask),
            ).last_hidden_state  # (B, N, H)
            logits = target.lm_head(h)
            n_nodes = dt.tokens.shape[1]
            if greedy:
                path, alen, bonus = ops.verify_greedy(logits, dt.tokens, dt.parents, min(max_accept, n_nodes - 1))
            else:
                path, alen, bonus = ops.verify_sampling(
                    logits, dt.tokens, dt.parents, temperature, top_k, top_p, generator=generator,
                    max_accept=min(max_accept, n_nodes - 1),
                )
            alen = torch.where(done_t, 0, alen)  # finished rows accept nothing and keep their cache length
            cache.compact_(path, alen, active=~done_t)
            _sync(device)
            t2 = time.perf_counter()
            # Accepted tokens then the bonus, per row: (B, depth + 1), the first alen+1 valid.
            acc = torch.gather(dt.tokens, 1, path[:, 1:].clamp(min=0))
            ext = torch.cat([acc, acc[:, :1]], 1)
            ext.scatter_(1, alen.unsqueeze(1), bonus.unsqueeze(1))
            feats = torch.gather(h, 1, path.clamp(min=0).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            drafter.extend(ext, feats, torch.where(done_t, 0, alen + 1))
            ext_l, alen_l = ext.tolist(), alen.tolist()
            active = [not d for d in done]
            stats.target_forwards += 1
            for r in range(b):
                if active[r]:
                    stats.accepted_draft_tokens += alen_l[r]
                    stats.row_steps += 1
                    while len(stats.accept_len_hist) <= alen_l[r]:
                        stats.accept_len_hist.append(0)
                    stats.accept_len_hist[alen_l[r]] += 1
            before = [len(t) for t in new_tokens]
            _emit(new_tokens, done, ext_l, [a + 1 for a in alen_l], eos, max_new_tokens, active)
            if streamer is not None and active[0]:
                streamer.put(torch.tensor(new_tokens[0][before[0] :], dtype=torch.long))
            done_t = torch.tensor(done, device=device)
            t3 = time.perf_counter()
            stats.time_draft += t1 - t0
            stats.time_verify += t2 - t1
            stats.time_other += t3 - t2
    if streamer is not None:
        streamer.end()
    stats.new_tokens = sum(len(t) for t in new_tokens)
    width = max(len(t) for t in new_tokens)
    gen = torch.full((b, width), pad_token_id, dtype=input_ids.dtype)
    for r, toks in enumerate(new_tokens):
        gen[r, : len(toks)] = torch.tensor(toks, dtype=input_ids.dtype)
    stats.time_total = time.perf_counter() - t_start
    return GenerateOutput(sequences=torch.cat([input_ids, gen.to(device)], 1), stats=stats)


def _pick(logits, greedy, temperature, top_k, top_p, generator):
    """The first token after the prompt: logits (B, 1, V) of the last prompt position."""
    if greedy:
        return logits[:, 0].float().argmax(-1)
    b = logits.shape[0]
    zeros = torch.zeros(b, 1, dtype=torch.int64, device=logits.device)
    # A one-node tree: nothing to accept, the bonus is a plain sample from the processed distribution.
    _, _, tok = ops.verify_sampling(logits.contiguous(), zeros, zeros - 1, temperature, top_k, top_p, generator=generator)
    return tok


def _emit(new_tokens, done, rows, counts, eos, max_new, active=None):
    """Appends each active row's first counts[r] tokens, stopping at EOS or max_new tokens."""
    for r, toks in enumerate(rows):
        if done[r] or (active is not None and not active[r]):
            continue
        for t in toks[: counts[r]]:
            new_tokens[r].append(t)
            if t in eos or len(new_tokens[r]) >= max_new:
                done[r] = True
                break


def _check_images(target: Target, input_ids, attention_mask, inputs) -> None:
    """Image placeholders in the prompt must match the images given."""
    if target.kind == "text":
        return
    ids = target.image_token_ids()
    n_tokens = int(torch.isin(input_ids[attention_mask.bool()], torch.tensor(ids, device=input_ids.device)).sum()) if ids else 0
    has_pixels = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
    if n_tokens and not has_pixels:
        raise ValueError(f"the prompt holds {n_tokens} image tokens but no pixel_values were given")
    if has_pixels and not n_tokens:
        raise ValueError("pixel_values were given but the prompt holds no image token")
