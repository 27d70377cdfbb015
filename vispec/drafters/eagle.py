"""EAGLE-2 style drafter: one decoder layer over [token embedding ; target feature].

The drafter shares the target's frozen input embeddings and lm_head (they are
referenced, not owned: they are neither trained nor saved with the drafter). Its
own parameters are ``fc`` (2H -> H) and one Llama-style decoder layer whose input
layernorm is absent (as in EAGLE's first layer), with no final norm.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import DraftTree, PrefillInputs, TreeConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DraftState:
    """Per-request decoding state of an EAGLE-style drafter (one cache entry per drafter input)."""

    k: torch.Tensor  # (B, Hkv, S, D) drafter KV cache
    v: torch.Tensor
    lens: torch.Tensor  # (B,) cache slots used
    next_pos: torch.Tensor  # (B,) RoPE position of the next input (slots and positions differ: see begin)
    roots: torch.Tensor  # (B,) last accepted token: the next tree's root
    max_len: int
    last_hidden: torch.Tensor | None = None  # (B, H) output at each row's last committed input
    glob: torch.Tensor | None = None  # (B, H) ViSpec: each row's latest global image feature


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # q/k/v projections with bias (Qwen-based checkpoints)
    fc_bias: bool = True
    num_q: int = 2  # ViSpec: learnable queries per image (num_q - 1 compressed tokens + 1 global feature)
    drafter_type: str = "eagle"
    # > 0: the drafter scores only this many tokens (ids in the ``d2t`` buffer, chosen by frequency in its
    # training data) instead of the whole vocabulary. Drafting gets cheaper; verification is unchanged, so
    # output is too (a token outside the set can still be the target's bonus token, never a draft).
    draft_vocab_size: int = 0

    @classmethod
    def from_target(cls, model, **overrides) -> "DrafterConfig":
        tc = model.config.get_text_config()
        heads = tc.num_attention_heads
        rope = getattr(tc, "rope_parameters", None) or {}
        cfg = dict(
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab_size=tc.vocab_size,
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))),
        )
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_dict(cls, d: dict) -> "DrafterConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x (B, H, T, D) at positions (B, T)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float().unsqueeze(-1) * inv  # (B, T, D/2)
    emb = torch.cat([ang, ang], -1).unsqueeze(1)  # (B, 1, T, D)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        h, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(h, c.num_attention_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, h, bias=False)


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama decoder layer without the input layernorm (as EAGLE's first layer), over an external KV cache.

    Parameter names follow the EAGLE / ViSpec checkpoints: ``self_attn.{q,k,v,o}_proj``,
    ``mlp.{gate,up,down}_proj``, ``post_attention_layernorm``.
    """

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, positions, kv, write_pos, visible):
        """x (B, T, H); kv = (K, V) caches (B, Hkv, S, D) written at write_pos (B, T); visible (B, T, S) bool."""
        b, t, _ = x.shape
        c, a = self.c, self.self_attn
        q = a.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        keys, values = kv
        rows = torch.arange(b, device=x.device).unsqueeze(1).expand_as(write_pos)
        keys[rows, :, write_pos] = k.transpose(1, 2).to(keys.dtype)
        values[rows, :, write_pos] = v.transpose(1, 2).to(values.dtype)
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible.unsqueeze(1), enable_gqa=c.num_attention_heads != c.num_key_value_heads
        )
        h = x + a.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleDrafter(nn.Module):
    """EAGLE-2 drafter (see the module docstring); implements :class:`vispec.drafters.Drafter`."""

    def __init__(self, config: DrafterConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=config.fc_bias)
        self.layers = nn.ModuleList([DecoderLayer(config)])  # one layer; a list for the checkpoints' names
        # Draft-vocabulary index -> token id (saved with the weights), or None for the full vocabulary.
        self.register_buffer("d2t", torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None)
        self._head_rows = None  # (key, lm_head rows of d2t): cached, the head is frozen
        # Shared with the target, frozen, not part of this module's parameters or state dict.
        self._shared = (embed_tokens, lm_head)
        self.state: DraftState | None = None

    # -- construction / persistence ---------------------------------------------------------
    @classmethod
    def from_target(cls, model, seed: int | None = None, **overrides) -> "EagleDrafter":
        """A randomly initialised drafter sized for ``model`` (in its dtype and on its device)."""
        config = DrafterConfig.from_target(model, drafter_type=cls.drafter_type(), **overrides)
        if seed is not None:
            torch.manual_seed(seed)
        d = cls(config, model.get_input_embeddings(), model.get_output_embeddings())
        d._init_weights()
        p = next(model.parameters())
        return d.to(device=p.device, dtype=p.dtype)

    @classmethod
    def drafter_type(cls) -> str:
        return "eagle"

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """Config + weights (safetensors); ``dtype`` casts the floating-point weights (e.g. bf16 to ship)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
                 for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path, model) -> "EagleDrafter":
        """Loads a drafter saved with :meth:`save_pretrained` for the target ``model``."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: not a vispec drafter directory")
        config = DrafterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        if config.drafter_type != cls.drafter_type():
            raise ValueError(f"{path} holds a {config.drafter_type!r} drafter, not {cls.drafter_type()!r}")
        d = cls(config, model.get_input_embeddings(), model.get_output_embeddings())
        d.check_target(model)
        d.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        p = next(model.parameters())
        return d.to(device=p.device, dtype=p.dtype)

    @classmethod
    def from_official(cls, path, model, num_q: int = 2) -> "EagleDrafter":
        """Loads an EAGLE-2 (SafeAILab/EAGLE) or ViSpec (KangJialiang/ViSpec) release checkpoint.

        Their layout: config.json (hidden_size, intermediate_size, num_attention_heads,
        num_key_value_heads, rms_norm_eps, rope_theta, vocab_size, optional qkv_bias and
        bias) and pytorch_model.bin or model.safetensors with ``fc``, ``layers.0.*``, for
        ViSpec ``imadpt.*`` and ``img_fc``, and a copy of the target's ``embed_tokens``
        (dropped: the target's own embeddings are used). Head dim is hidden / heads, as
        those codebases compute it. ``num_q`` is not in their config (default 2).
        """
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found")
        raw = json.loads(cfg_file.read_text())
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"{cfg_file} lacks {', '.join(missing)}: not an EAGLE / ViSpec checkpoint config")
        heads = raw["num_attention_heads"]
        config = DrafterConfig(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw["hidden_size"] // heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            qkv_bias=bool(raw.get("qkv_bias", False)),
            fc_bias=bool(raw.get("bias", True)),
            num_q=num_q,
            drafter_type=cls.drafter_type(),
        )
        if (path / WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            state = load_file(str(path / WEIGHTS_NAME))
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor pytorch_model.bin")
        state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head."))}
        d = cls(config, model.get_input_embeddings(), model.get_output_embeddings())
        d.check_target(model)
        result = d.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path} does not match a {cls.drafter_type()} drafter: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        p = next(model.parameters())
        return d.to(device=p.device, dtype=p.dtype)

    def check_target(self, model) -> None:
        tc = model.config.get_text_config()
        c = self.config
        if tc.hidden_size != c.hidden_size:
            raise ValueError(f"drafter hidden size {c.hidden_size} does not match the target's {tc.hidden_size}")
        emb = model.get_input_embeddings()
        if emb.weight.shape[0] != c.vocab_size:
            raise ValueError(
                f"drafter vocabulary ({c.vocab_size} tokens) does not match the target's ({emb.weight.shape[0]}): "
                "it was built for another model or tokenizer"
            )
        if emb is not self._shared[0]:
            raise ValueError("this drafter shares the embeddings of another model instance; rebuild it for this target")
        mine, theirs = self.fc.weight, emb.weight
        if mine.dtype != theirs.dtype or mine.device != theirs.device:
            raise ValueError(
                f"the drafter's weights are {mine.dtype} on {mine.device}, the target's {theirs.dtype} on {theirs.device}: "
                "move it with drafter.to(device=..., dtype=...)"
            )

    def set_draft_vocab(self, token_ids) -> None:
        """Restrict drafting to ``token_ids`` (distinct ids of the target's vocabulary)."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
        v = self.config.vocab_size
        if ids.numel() == 0:
            raise ValueError("draft vocabulary is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= v:
            raise ValueError(f"draft vocabulary holds ids outside [0, {v})")
        if ids.unique().numel() != ids.numel():
            raise ValueError("draft vocabulary holds repeated ids")
        self.config.draft_vocab_size = ids.numel()
        self.d2t = ids.to(self.fc.weight.device)
        self._head_rows = None

    @staticmethod
    def frequent_tokens(token_lists, size: int, always=()) -> list[int]:
        """The ``size`` most frequent ids over ``token_lists`` (ties: lower id first), ``always`` included."""
        from collections import Counter

        counts = Counter()
        for ids in token_lists:
            counts.update(int(t) for t in ids)
        keep = list(dict.fromkeys(int(t) for t in always))
        for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(keep) >= size:
                break
            if t not in keep:
                keep.append(t)
        return sorted(keep[:size])

    @property
    def embed_tokens(self):
        return self._shared[0]

    @property
    def lm_head(self):
        return self._shared[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The target's lm_head on drafter states, over the draft vocabulary (``d2t``) when there is one.
        On CPU a plain Linear head is applied as W @ h^T: MKL's skinny GEMM for the few rows a draft step
        has is several times slower than that."""
        head = self.lm_head
        if self.d2t is None and not (h.device.type == "cpu" and type(head) is nn.Linear):
            return head(h)
        if type(head) is not nn.Linear:
            raise TypeError(f"a draft vocabulary needs a plain nn.Linear lm_head, not {type(head).__name__}")
        w, bias = head.weight, head.bias
        if self.d2t is not None:
            key = (w.data_ptr(), w._version, w.dtype, self.d2t.data_ptr())
            if self._head_rows is None or self._head_rows[0] != key:
                idx = self.d2t.to(w.device)
                self._head_rows = (key, w.detach().index_select(0, idx), None if bias is None else bias.detach()[idx])
            w, bias = self._head_rows[1], self._head_rows[2]
        flat = h.reshape(-1, h.shape[-1])
        out = torch.matmul(w, flat.t()).t() if h.device.type == "cpu" else flat @ w.t()
        if bias is not None:
            out = out + bias
        return out.reshape(*h.shape[:-1], -1)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into :meth:`logits`' last dimension."""
        return index if self.d2t is None else self.d2t[index]

    # -- decoding state --------------------------------------------------------------------
    # The drafter's cache holds one entry per drafter input; an entry's cache slot and its
    # RoPE position may differ (drafters that drop or compress image positions keep the
    # target's position ids), so both are tracked: ``lens`` (slots used) and ``next_pos``.
    def begin(self, batch_size: int, max_len: int, device, tree: TreeConfig | None = None) -> None:
        """Allocates the drafter cache: ``max_len`` committed entries, plus the draft tree's slots."""
        c = self.config
        dtype = self.fc.weight.dtype
        if tree is not None:
            max_len += tree.top_k * tree.depth
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.state = DraftState(
            k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device),
            lens=zeros, next_pos=zeros.clone(), roots=zeros.clone(), max_len=max_len,
        )

    def check_tree(self, tree: TreeConfig) -> None:
        if self.d2t is not None and tree.top_k > self.d2t.numel():
            raise ValueError(f"tree top_k {tree.top_k} exceeds the drafter's vocabulary of {self.d2t.numel()} tokens")

    def fuse(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Drafter input from (embedding of the next token, target feature): fc([e ; f])."""
        return self.fc(torch.cat([embeds, features.to(embeds.dtype)], -1))

    def _append(self, x, positions, n_valid, roots):
        """Runs (B, T) new inputs causally after each row's committed entries; commits n_valid of them.

        ``positions`` (B, T) are their RoPE positions; ``roots`` (B,) is each row's last accepted
        token, the root of the next tree.
        """
        s = self.state
        b, t, _ = x.shape
        dev = x.device
        slots = s.lens.unsqueeze(1) + torch.arange(t, device=dev)  # (B, T)
        # No bounds check here (it would be a host sync every step): begin() sized the cache for the
        # request, and a slot past it fails the indexed write below.
        keys = torch.arange(s.max_len, device=dev)
        visible = keys.view(1, 1, -1) <= slots.unsqueeze(-1)  # causal over committed + new entries
        hidden = self.layers[0](x, positions, (s.k, s.v), slots, visible)
        rows = torch.arange(b, device=dev)
        last = (n_valid - 1).clamp(min=0)
        has = n_valid > 0
        new = hidden[rows, last]
        s.last_hidden = new if s.last_hidden is None else torch.where(has.unsqueeze(1), new, s.last_hidden)
        s.next_pos = torch.where(has, positions[rows, last] + 1, s.next_pos)
        s.lens = s.lens + n_valid
        s.roots = roots
        return hidden

    def prefill(self, inputs: PrefillInputs) -> None:
        x, positions, n_valid = self.prefill_sequence(inputs)
        if x.shape[1] > self.state.max_len:  # once per request; decoding steps stay within begin()'s budget
            raise ValueError(f"drafter cache of {self.state.max_len} positions is full")
        self.state.lens.zero_()
        self.state.next_pos.zero_()
        self.state.last_hidden = None
        self._append(x, positions, n_valid, inputs.next_tokens)

    def prefill_sequence(self, inputs: PrefillInputs):
        """(inputs (B, T, H), RoPE positions (B, T), valid count (B,)) of the prompt; EAGLE keeps every position."""
        b, p, _ = inputs.inputs_embeds.shape
        x = self.fuse(self.shifted_embeds(inputs), inputs.features)
        positions = torch.arange(p, device=x.device).expand(b, p)
        return x, positions, inputs.lengths

    def forward_sequence(self, inputs: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced outputs over one prompt-like sequence (batch 1), for training: (hidden (T, H),
        original positions (T,)). Uses a fresh cache: no decoding state is read or kept."""
        p = inputs.inputs_embeds.shape[1]
        self.begin(1, p, inputs.inputs_embeds.device)
        x, positions, counts = self.prefill_sequence(inputs)
        t = int(counts[0])
        x, positions = x[:, :t], positions[:, :t]
        slots = torch.arange(t, device=x.device)
        visible = slots.view(1, 1, -1) <= slots.view(1, -1, 1)  # causal over the drafter's own sequence
        kv = (self.state.k[:, :, :t].to(x.dtype), self.state.v[:, :, :t].to(x.dtype))
        hidden = self.layers[0](x, positions, kv, slots.unsqueeze(0), visible)
        self.state = None
        return hidden[0], positions[0]

    def shifted_embeds(self, inputs: PrefillInputs) -> torch.Tensor:
        """Embedding of the token following each position: inputs_embeds[:, 1:] and the new token at the end."""
        b, p, _ = inputs.inputs_embeds.shape
        emb = torch.cat([inputs.inputs_embeds[:, 1:], inputs.inputs_embeds[:, :1]], 1).clone()
        nxt = self.embed_tokens(inputs.next_tokens).to(emb.dtype)  # (B, H)
        emb[torch.arange(b, device=emb.device), inputs.lengths - 1] = nxt
        return emb

    def extend(self, tokens, features, n_valid) -> None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        last = tokens[rows, (n_valid - 1).clamp(min=0)]
        roots = torch.where(n_valid > 0, last, self.state.roots)
        positions = self.state.next_pos.unsqueeze(1) + torch.arange(tokens.shape[1], device=tokens.device)
        self._append(self.fuse(self.embed_tokens(tokens), features), positions, n_valid, roots)

    # -- EAGLE-2 dynamic tree ----------------------------------------------------------------
    @torch.no_grad()
    def propose(self, tree: TreeConfig) -> DraftTree:
        s = self.state
        k, depth = tree.top_k, tree.depth
        h = s.last_hidden  # (B, H): the drafter's output at each row's last committed position
        b, dev = h.shape[0], h.device
        lens = s.lens
        logp = torch.log_softmax(self.logits(h).float(), -1)
        score, tok = logp.topk(k, -1)  # (B, k): level 1
        tok = self.token_ids(tok)
        pool_score, pool_tok = [score], [tok]
        pool_parent = [torch.full((b, k), -1, dtype=torch.int64, device=dev)]
        pool_depth = [torch.ones(b, k, dtype=torch.int64, device=dev)]
        front_tok, front_score, front_hid = tok, score, h.unsqueeze(1).expand(b, k, -1)
        front_pool = torch.arange(k, device=dev).expand(b, k)
        slots = k * max(depth - 1, 0)
        front_anc = torch.zeros(b, k, slots, dtype=torch.bool, device=dev)  # processed ancestors (tree slots)
        keys = torch.arange(s.max_len, device=dev).view(1, 1, -1)
        base = k
        for d in range(2, depth + 1):
            # Run the frontier (nodes at depth d-1) at position next_pos-1+(d-1), in tree slots (d-2)*k ...
            slot = (d - 2) * k + torch.arange(k, device=dev)  # (k,)
            write = lens.unsqueeze(1) + slot  # (B, k)
            own = torch.zeros(b, k, slots, dtype=torch.bool, device=dev)
            own[:, torch.arange(k, device=dev), slot] = True
            anc = front_anc | own  # (B, k, slots)
            visible = keys < lens.view(b, 1, 1)  # committed prefix ...
            tree_vis = torch.zeros(b, k, s.max_len, dtype=torch.bool, device=dev)
            tree_vis.scatter_(2, (lens.view(b, 1, 1) + torch.arange(slots, device=dev)).expand(b, k, slots), anc)
            visible = visible | tree_vis  # ... plus the node's own ancestors and itself
            pos = (s.next_pos - 1 + (d - 1)).unsqueeze(1).expand(b, k)
            x = self.fuse(self.embed_tokens(front_tok), front_hid)
            hid = self.layers[0](x, pos, (s.k, s.v), write, visible)  # (B, k, H)
            lp = torch.log_softmax(self.logits(hid).float(), -1)
            ctop, ctok = lp.topk(k, -1)  # (B, k, k)
            ctok = self.token_ids(ctok)
            cum = front_score.unsqueeze(-1) + ctop  # cumulative log-prob of each child
            pool_score.append(cum.reshape(b, k * k))
            pool_tok.append(ctok.reshape(b, k * k))
            pool_parent.append(front_pool.unsqueeze(-1).expand(b, k, k).reshape(b, k * k))
            pool_depth.append(torch.full((b, k * k), d, dtype=torch.int64, device=dev))
            # The best k children become the next frontier.
            best_score, best = cum.reshape(b, k * k).topk(k, -1)
            par = best // k  # frontier index of each new node's parent
            front_tok = torch.gather(ctok.reshape(b, k * k), 1, best)
            front_score = best_score
            front_hid = torch.gather(hid, 1, par.unsqueeze(-1).expand(b, k, hid.shape[-1]))
            front_anc = torch.gather(anc, 1, par.unsqueeze(-1).expand(b, k, slots))
            front_pool = base + best
            base += k * k
        return build_tree(
            torch.cat(pool_score, 1), torch.cat(pool_tok, 1), torch.cat(pool_parent, 1), torch.cat(pool_depth, 1),
            s.roots, tree.total_tokens,
        )


def build_tree(score, tok, parent, depth, roots, total):
    """Keeps the ``total`` best candidates of a pool ordered by depth; returns them as a topological tree.

    A child's cumulative log-prob never exceeds its parent's and the sort is stable over a
    depth-ordered pool, so the kept set contains every kept node's parent.
    """
    b, c = score.shape
    dev = score.device
    score = torch.nan_to_num(score, nan=-math.inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :total]
    sel = torch.sort(order, dim=1).values  # pool order = topological order
    node_of = torch.zeros(b, c, dtype=torch.int64, device=dev)  # pool index -> node index (root = 0)
    node_of.scatter_(1, sel, torch.arange(1, total + 1, device=dev).expand(b, total))
    par_pool = torch.gather(parent, 1, sel)
    par_node = torch.where(par_pool < 0, 0, torch.gather(node_of, 1, par_pool.clamp(min=0)))
    tokens = torch.cat([roots.view(b, 1), torch.gather(tok, 1, sel)], 1)
    parents = torch.cat([torch.full((b, 1), -1, dtype=torch.int64, device=dev), par_node], 1)
    depths = torch.cat([torch.zeros(b, 1, dtype=torch.int64, device=dev), torch.gather(depth, 1, sel)], 1)
    return DraftTree(tokens=tokens, parents=parents, depth=depths)
