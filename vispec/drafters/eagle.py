"""EAGLE-style drafters, in two generations (``DrafterConfig.generation``).

Both share the target's frozen input embeddings (referenced, not owned: neither
trained nor saved with the drafter) and read, at each position, the embedding e of
the next token and a feature f; each has one decoder layer over a KV cache of its own.

- **EAGLE-2** (generation 2; SafeAILab/EAGLE, ViSpec): f is the target's last hidden
  state (after its final norm). Input ``fc([e ; f])`` (2H -> H) to a Llama decoder
  layer without input layernorm (``layers.0.*``), no final norm; logits are the
  target's own lm_head on the output.
- **EAGLE-3** (generation 3; SafeAILab/EAGLE-3, SpecForge): f is ``fc`` (3H -> H, no
  bias) of the target's hidden states at three layers (``feature_layers``: by default
  the inputs of layers 2, L/2 and L-3, EAGLE-3's choice). The decoder layer
  (``midlayer.*``) reads ``[input_layernorm(e) ; hidden_norm(f)]`` (2H into q/k/v),
  its residual stream starts from f; then a final ``norm`` and an lm_head of the
  drafter's own over its draft vocabulary (initialised from the target's rows).

In draft steps both feed the layer's output at the parent back as the child's f (for
EAGLE-3 without ``fc``: the output is already H wide).
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
GENERATIONS = (2, 3)


def eagle3_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default feature layers for a target of ``num_layers`` decoder layers: the inputs of layers
    2, L // 2 and L - 3 (outputs of layers 1, L/2 - 1, L - 4), clamped into range for tiny targets."""
    return [min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)]


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
    glob_seq: torch.Tensor | None = None  # (B, T, H) ViSpec: the global feature each prefill input saw (training)


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
    global_feature: bool = True  # ViSpec: inject the image's global feature into text positions (False: ablation)
    # HiViS: step-dependent residual vectors (0: the plain text-only drafter). Row 0 goes with the target's
    # features, row j with the drafter's own output at draft step j (the last row for deeper steps).
    hivis_residuals: int = 0
    drafter_type: str = "eagle"
    # > 0: the drafter scores only this many tokens (ids in the ``d2t`` buffer, chosen by frequency in its
    # training data) instead of the whole vocabulary. Drafting gets cheaper; verification is unchanged, so
    # output is too (a token outside the set can still be the target's bonus token, never a draft).
    draft_vocab_size: int = 0
    generation: int = 2  # 2: EAGLE-2 head; 3: EAGLE-3 head (module docstring)
    # EAGLE-3: the target hidden states fused by fc, as indices of transformers' ``hidden_states``
    # (i = the input of decoder layer i; 0 = the input embeddings).
    feature_layers: list[int] | None = None

    def __post_init__(self):
        if self.generation not in GENERATIONS:
            raise ValueError(f"DrafterConfig.generation must be one of {GENERATIONS}, got {self.generation!r}")
        if self.generation == 3:
            fl = self.feature_layers
            if not fl or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in fl):
                raise ValueError(f"an EAGLE-3 drafter needs feature_layers, a non-empty list of layer indices >= 0, got {fl!r}")
            self.feature_layers = list(fl)
        elif self.feature_layers is not None:
            raise ValueError("feature_layers is an EAGLE-3 setting (generation=3); EAGLE-2 heads read the last hidden state")

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
        if overrides.get("generation") == 3:
            cfg["fc_bias"] = False  # EAGLE-3's fc has none
            cfg["feature_layers"] = eagle3_layers(tc.num_hidden_layers)
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
    def __init__(self, c: DrafterConfig, in_features: int):
        super().__init__()
        h, hd = c.hidden_size, c.head_dim
        self.q_proj = nn.Linear(in_features, c.num_attention_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(in_features, c.num_key_value_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(in_features, c.num_key_value_heads * hd, bias=c.qkv_bias)
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
    ``mlp.{gate,up,down}_proj``, ``post_attention_layernorm``. The forward is split in two,
    :meth:`qkv` then :meth:`attend`, so that training can attend over keys it concatenates
    (the training-time test) while decoding writes them into the cache.
    """

    def __init__(self, c: DrafterConfig, in_features: int | None = None):
        super().__init__()
        self.c = c
        self.self_attn = Attention(c, in_features or c.hidden_size)
        self.mlp = MLP(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def split(self, x):
        """(what q/k/v read, the residual stream) of the layer input x."""
        return x, x

    def qkv(self, x, positions):
        """x (B, T, in) at RoPE positions (B, T) -> q (B, heads, T, D), k, v (B, Hkv, T, D), residual (B, T, H)."""
        b, t, _ = x.shape
        c, a = self.c, self.self_attn
        inp, residual = self.split(x)
        q = a.q_proj(inp).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = a.k_proj(inp).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = a.v_proj(inp).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v, residual

    def attend(self, residual, q, keys, values, visible):
        """The rest of the layer: attention of q over keys/values (B, Hkv, S, D) where visible (B, T, S)."""
        b, _, t, _ = q.shape
        c, a = self.c, self.self_attn
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible.unsqueeze(1), enable_gqa=c.num_attention_heads != c.num_key_value_heads
        )
        h = residual + a.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x, positions, kv, write_pos, visible):
        """x (B, T, in); kv = (K, V) caches (B, Hkv, S, D) written at write_pos (B, T); visible (B, T, S) bool."""
        q, k, v, residual = self.qkv(x, positions)
        keys, values = kv
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(write_pos)
        keys[rows, :, write_pos] = k.transpose(1, 2).to(keys.dtype)
        values[rows, :, write_pos] = v.transpose(1, 2).to(values.dtype)
        return self.attend(residual, q, keys, values, visible)


class Eagle3Layer(DecoderLayer):
    """EAGLE-3's ``midlayer``: its input is [e ; f] (2H); q/k/v read [input_layernorm(e) ; hidden_norm(f)]
    and the residual stream starts from f."""

    def __init__(self, c: DrafterConfig):
        super().__init__(c, in_features=2 * c.hidden_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def split(self, x):
        h = self.c.hidden_size
        e, f = x[..., :h], x[..., h:]
        return torch.cat([self.input_layernorm(e), self.hidden_norm(f)], -1), f


class EagleDrafter(nn.Module):
    """EAGLE drafter of either generation (see the module docstring); implements
    :class:`vispec.drafters.Drafter`. The ViSpec and HiViS kinds subclass it and change only how the
    prompt becomes the drafter's sequence (and, for ViSpec, the feature), so each kind exists in both
    generations."""

    def __init__(self, config: DrafterConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        h = config.hidden_size
        # Draft-vocabulary index -> token id (saved with the weights), or None for the full vocabulary.
        self.register_buffer("d2t", torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None)
        if config.generation == 2:
            self.fc = nn.Linear(2 * h, h, bias=config.fc_bias)
            self.layers = nn.ModuleList([DecoderLayer(config)])  # one layer; a list for the checkpoints' names
        else:
            self.fc = nn.Linear(len(config.feature_layers) * h, h, bias=config.fc_bias)
            self.midlayer = Eagle3Layer(config)
            self.norm = RMSNorm(h, config.rms_norm_eps)
            self.lm_head = nn.Linear(h, config.draft_vocab_size or config.vocab_size, bias=False)
        self._head_rows = None  # (key, target lm_head rows of d2t): cached, the head is frozen
        # Shared with the target, frozen, not part of this module's parameters or state dict.
        self._shared = (embed_tokens, lm_head)
        self.state: DraftState | None = None

    @property
    def layer(self) -> DecoderLayer:
        return self.layers[0] if self.config.generation == 2 else self.midlayer

    @property
    def feature_layers(self) -> list[int] | None:
        """The target hidden states this drafter reads (None: the last one, after the final norm)."""
        return self.config.feature_layers

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
    def from_drafter(cls, other: "EagleDrafter", model, seed: int | None = None, **overrides) -> "EagleDrafter":
        """This kind on ``other``'s base (generation, feature layers, sizes, draft vocabulary) with its
        weights, e.g. a ViSpec drafter for stage 2 from a stage-1 EAGLE head; parameters ``other`` lacks keep
        their initialisation (ViSpec's img_fc starts as the identity, so the head's outputs are unchanged)."""
        keep = {k: v for k, v in asdict(other.config).items() if k not in ("drafter_type", "draft_vocab_size")}
        d = cls.from_target(model, seed=seed, **{**keep, **overrides})
        if other.d2t is not None:
            d.set_draft_vocab(other.d2t)
        result = d.load_state_dict(d.adopt(other.state_dict()), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"a {cls.drafter_type()} drafter has no place for {other.drafter_type()}'s "
                             f"{result.unexpected_keys}")
        return d

    def adopt(self, state: dict) -> dict:
        """Another drafter's state dict as this one's (:meth:`from_drafter`); HiViS resizes its residuals."""
        return state

    @classmethod
    def drafter_type(cls) -> str:
        return "eagle"

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.generation == 3:
            self._init_own_head()

    def _init_own_head(self):
        """EAGLE-3: the drafter's lm_head starts as the target's rows of its draft vocabulary."""
        w = self.target_head.weight
        rows = w.detach() if self.d2t is None else w.detach().index_select(0, self.d2t.to(w.device))
        self.lm_head = nn.Linear(rows.shape[1], rows.shape[0], bias=False).to(device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(rows)

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
        """Loads a release checkpoint: EAGLE-2 (SafeAILab/EAGLE), ViSpec (KangJialiang/ViSpec) or EAGLE-3
        (SafeAILab/EAGLE-3, SpecForge; recognised by its ``midlayer.*`` keys).

        EAGLE-2 / ViSpec layout: config.json (hidden_size, intermediate_size, num_attention_heads,
        num_key_value_heads, rms_norm_eps, rope_theta, vocab_size, optional qkv_bias and bias) and
        pytorch_model.bin or model.safetensors with ``fc``, ``layers.0.*``, for ViSpec ``imadpt.*`` and
        ``img_fc``; head dim is hidden / heads, as those codebases compute it (unless the config names one);
        ``num_q`` is not in their config (default 2); a ``speculative_token_map.pt`` beside (SGLang's hot
        tokens) becomes the draft vocabulary.

        EAGLE-3 layout: ``fc.weight`` (H, n * H), ``midlayer.*`` (q/k/v over 2H, ``hidden_norm``,
        ``input_layernorm``), ``norm.weight``, ``lm_head.weight`` (draft vocabulary, H), ``d2t`` (offsets:
        token id = draft index + d2t[index]) and ``t2d`` (bool over the vocabulary); config keys as above
        plus ``draft_vocab_size``, ``head_dim``, and the captured layers either as SGLang / SpecForge
        give them (``eagle_config.eagle_aux_hidden_state_layer_ids``: outputs of those layers) or as vLLM
        does (top-level ``eagle_aux_hidden_state_layer_ids``: inputs of those layers), else EAGLE-3's
        default for the target. A copy of the target's ``embed_tokens`` is dropped in every layout.
        """
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found")
        raw = json.loads(cfg_file.read_text())
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"{cfg_file} lacks {', '.join(missing)}: not an EAGLE / ViSpec checkpoint config")
        if (path / WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file

            state = load_file(str(path / WEIGHTS_NAME))
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor pytorch_model.bin")
        heads = raw["num_attention_heads"]
        common = dict(
            hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"], num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads, vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(raw.get("rope_theta", 10000.0)),
            num_q=num_q, drafter_type=cls.drafter_type(),
        )
        extra, state = cls._official_layout(state)
        if any(k.startswith("midlayer.") for k in state):
            config, state = _eagle3_official(raw, state, model, {**common, **extra}, cfg_file)
        else:
            config = DrafterConfig(**common, **extra, head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                                   qkv_bias=bool(raw.get("qkv_bias", False)), fc_bias=bool(raw.get("bias", True)))
        state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head.")) or
                 (config.generation == 3 and k.startswith("lm_head."))}
        d = cls(config, model.get_input_embeddings(), model.get_output_embeddings())
        d.check_target(model)
        result = d.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path} does not match a {cls.drafter_type()} drafter: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        token_map = path / "speculative_token_map.pt"  # SGLang's hot tokens: an EAGLE-2 head's draft vocabulary
        if config.generation == 2 and token_map.is_file():
            d.set_draft_vocab(torch.load(token_map, map_location="cpu", weights_only=True))
        p = next(model.parameters())
        return d.to(device=p.device, dtype=p.dtype)

    @classmethod
    def _official_layout(cls, state: dict) -> tuple[dict, dict]:
        """(DrafterConfig settings a release's state dict implies, the state dict in this kind's names)."""
        return {}, state

    def check_target(self, model) -> None:
        tc = model.config.get_text_config()
        c = self.config
        if tc.hidden_size != c.hidden_size:
            raise ValueError(f"drafter hidden size {c.hidden_size} does not match the target's {tc.hidden_size}")
        if c.feature_layers is not None and max(c.feature_layers) >= tc.num_hidden_layers:
            raise ValueError(f"drafter reads the target's hidden states at layers {c.feature_layers}, but the target "
                             f"has {tc.num_hidden_layers} decoder layers (indices 0..{tc.num_hidden_layers - 1})")
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
        if self.config.generation == 3:
            self._init_own_head()  # its rows follow the vocabulary: they restart from the target's

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
    def target_head(self):
        """The target's lm_head (shared, frozen)."""
        return self._shared[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft logits of drafter outputs h, over the draft vocabulary (``d2t``) when there is one: the
        target's lm_head (EAGLE-2) or the drafter's final norm and own lm_head (EAGLE-3)."""
        if self.config.generation == 3:
            return self.lm_head(self.norm(h))
        return self.target_logits(h)

    def target_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The target's lm_head on hidden states h, over the draft vocabulary when there is one (what
        training scores the drafter against). On CPU a plain Linear head is applied as W @ h^T: MKL's
        skinny GEMM for the few rows a draft step has is several times slower than that."""
        head = self.target_head
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

    def fuse(self, embeds: torch.Tensor, features: torch.Tensor, step: int = 0, glob=None) -> torch.Tensor:
        """Layer input from (embedding of the next token, feature): EAGLE-2 ``fc([e ; f])``, EAGLE-3
        ``[e ; fc(f)]``. ``step`` 0: f is the target's; j >= 1: f is the drafter's own output fed back at its
        j-th draft step (the parent's), which EAGLE-3 takes as it is (no fc). ``glob``: ViSpec's global
        feature per position (see :meth:`condition`)."""
        f = features.to(embeds.dtype)
        if self.config.generation == 3 and step == 0:
            f = self.fc(f)
        f = self.condition(f, glob, step)
        if self.config.generation == 2:
            return self.fc(torch.cat([embeds, f, *self.fc_extra(f, step)], -1))
        return torch.cat([embeds, f], -1)

    def condition(self, f: torch.Tensor, glob=None, step: int = 0) -> torch.Tensor:
        """The feature (H wide) as the layer reads it; ViSpec injects the image's global feature here."""
        return f

    def fc_extra(self, f: torch.Tensor, step: int) -> list[torch.Tensor]:
        """More inputs of an EAGLE-2 head's fc after [e ; f] (HiViS: its step's residual vector)."""
        return []

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
        hidden = self.layer(x, positions, (s.k, s.v), slots, visible)
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

    def forward_sequence(self, inputs: PrefillInputs, steps: int = 1, embeds: torch.Tensor | None = None,
                         unroll_from: int = 0):
        """Outputs over one prompt-like sequence (batch 1), for training: (hidden (steps, T, H), original
        positions (T,)). Uses a fresh cache: no decoding state is read or kept.

        Step 0 is teacher forced (each input pairs the target's feature with the next token's embedding).
        ``steps`` > 1 is EAGLE-3's training-time test: at step j the input at drafter position t (original
        position p) pairs the drafter's own step j-1 output there with the embedding of token p + 1 + j
        (``embeds`` (L, H): the embeddings of the whole sequence by original position), at RoPE position
        p + j, and attends to the step-0 inputs up to t plus its own steps 1..j at t: exactly what a
        depth-(j+1) tree node sees in :meth:`propose` (the committed prefix, then its chain of ancestors).
        Steps j >= 1 run only at original positions >= ``unroll_from`` (their rows of ``hidden`` are zero
        elsewhere): a long prompt whose positions are never scored costs one step, not ``steps``.
        """
        p = inputs.inputs_embeds.shape[1]
        self.begin(1, p, inputs.inputs_embeds.device)
        x, positions, counts = self.prefill_sequence(inputs)
        glob_seq = self.state.glob_seq
        self.state = None
        t = int(counts[0])
        x, positions = x[:, :t], positions[:, :t]
        layer = self.layer
        q, k, v, res = layer.qkv(x, positions)
        slots = torch.arange(t, device=x.device)
        causal = (slots.view(1, 1, -1) <= slots.view(1, -1, 1))  # (1, T, T)
        first = layer.attend(res, q, k, v, causal)
        if steps == 1:
            return first, positions[0]
        if embeds is None:
            raise ValueError("forward_sequence with steps > 1 needs the sequence's embeddings (embeds)")
        rows = (positions[0] >= unroll_from).nonzero().squeeze(1)  # the unrolled positions
        pos = positions[:, rows]
        last = embeds.shape[0] - 1
        glob = None if glob_seq is None else glob_seq[:, rows]
        keys, values = [k], [v]
        diag = torch.eye(rows.numel(), dtype=torch.bool, device=x.device).unsqueeze(0)
        vis0 = causal[:, rows]  # the unrolled rows' view of step 0
        out, h = [first], first[:, rows]
        for j in range(1, steps):
            e = embeds[(pos[0] + 1 + j).clamp(max=last)].unsqueeze(0).to(x.dtype)  # beyond the end: masked
            q, k, v, res = layer.qkv(self.fuse(e, h, step=j, glob=glob), pos + j)
            keys.append(k)
            values.append(v)
            visible = torch.cat([vis0] + [diag] * j, -1)  # step 0 causally, steps 1..j at the same t
            h = layer.attend(res, q, torch.cat(keys, 2), torch.cat(values, 2), visible)
            out.append(first.new_zeros(first.shape).index_copy(1, rows, h))
        return torch.cat(out, 0), positions[0]

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
            x = self.fuse(self.embed_tokens(front_tok), front_hid, step=d - 1)
            hid = self.layer(x, pos, (s.k, s.v), write, visible)  # (B, k, H)
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


def _eagle3_official(raw: dict, state: dict, model, common: dict, cfg_file) -> tuple[DrafterConfig, dict]:
    """The DrafterConfig of an EAGLE-3 release and its state dict in vispec's terms (d2t as token ids)."""
    h = raw["hidden_size"]
    if raw.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{cfg_file}: a {raw['num_hidden_layers']}-layer EAGLE-3 head; vispec runs one-layer heads")
    if raw.get("target_hidden_size", h) != h:
        raise ValueError(f"{cfg_file}: target_hidden_size {raw['target_hidden_size']} != hidden_size {h}: such a "
                         "head needs its own embeddings, which vispec does not run (it shares the target's)")
    rs = raw.get("rope_scaling") or {}
    if rs.get("mrope_section") or rs.get("type") == "mrope" or rs.get("rope_type") == "mrope":
        raise ValueError(f"{cfg_file}: an M-RoPE drafter (rope_scaling {rs}); vispec's drafters use 1-D RoPE, and "
                         "running this one with it would draft with other attention than it was trained with")
    n_layers = model.config.get_text_config().num_hidden_layers
    fc = state.get("fc.weight")
    if fc is None or fc.shape[0] != h or fc.shape[1] % h:
        raise ValueError(f"{cfg_file.parent}: fc.weight {None if fc is None else tuple(fc.shape)} is not (H, n * H) "
                         f"with H = {h}")
    if "eagle_aux_hidden_state_layer_ids" in (raw.get("eagle_config") or {}):  # SGLang / SpecForge: layer outputs
        layers = [int(i) + 1 for i in raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
    elif "eagle_aux_hidden_state_layer_ids" in raw:  # vLLM: layer inputs, our numbering
        layers = [int(i) for i in raw["eagle_aux_hidden_state_layer_ids"]]
    else:
        layers = eagle3_layers(n_layers)
    if len(layers) * h != fc.shape[1]:
        raise ValueError(f"{cfg_file.parent}: fc reads {fc.shape[1] // h} hidden states but the layers are {layers}")
    state = {k: v for k, v in state.items() if k != "t2d"}
    vocab = raw["vocab_size"]
    dv = int(raw.get("draft_vocab_size") or state["lm_head.weight"].shape[0])
    d2t = state.pop("d2t", None)
    if dv != vocab:
        if d2t is None or d2t.shape != (dv,):
            raise ValueError(f"{cfg_file.parent}: draft_vocab_size {dv} needs a d2t of {dv} offsets")
        ids = torch.arange(dv) + d2t.long()
        if int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.unique().numel() != dv:
            raise ValueError(f"{cfg_file.parent}: d2t maps draft ids outside the vocabulary or onto one token twice")
        state["d2t"] = ids
    config = DrafterConfig(
        **common, head_dim=raw.get("head_dim") or h // raw["num_attention_heads"],
        qkv_bias="midlayer.self_attn.q_proj.bias" in state, fc_bias="fc.bias" in state,
        draft_vocab_size=0 if dv == vocab else dv, generation=3, feature_layers=layers,
    )
    return config, state


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
