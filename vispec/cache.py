"""A preallocated KV cache in the ``[B, Hkv, S_max, D]`` layout, implementing transformers' Cache API.

Every batch row has its own committed length (``lens``), because rows accept
different numbers of draft tokens each step. Three kinds of forward write into it:

* prefill (``mode="prefill"``): the (left-padded) prompt goes to positions 0..P-1 and
  the model's usual attention (SDPA with HF's padding mask) runs over those P
  positions; :meth:`unpad_` then shifts each row left so that no padding stays in the
  cache and ``lens[b]`` is the row's real prompt length;
* tree verification (``mode="tree"``): the N tree tokens go to ``lens[b] ..
  lens[b]+N-1`` and the attention function receives the whole buffers, which
  ``vispec.ops.tree_attention`` reads in place;
* compaction: :meth:`compact_` moves the accepted entries next to the prefix for all
  layers in one ``vispec.ops.compact_kv_`` call and advances ``lens``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops


class TreeCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "TreeCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        o = self.owner
        if b != o.rows:
            raise ValueError(f"TreeCache was made for batch size {o.rows}, the model wrote {b} rows")
        self.keys = torch.zeros(b, h, o.max_len, d, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, h, o.max_len, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        n = key_states.shape[-2]
        if o.mode == "prefill":
            self.keys[:, :, :n] = key_states
            self.values[:, :, :n] = value_states
            return self.keys[:, :, :n], self.values[:, :, :n]
        # Tree / append: row b writes at lens[b] + i. (B, N) indices select (B, N, H, D) slices.
        lens = o.lens_on(self.keys.device)
        pos = lens.unsqueeze(1) + torch.arange(n, device=lens.device)
        rows = torch.arange(o.rows, device=lens.device).unsqueeze(1).expand_as(pos)
        self.keys[rows, :, pos] = key_states.transpose(1, 2)
        self.values[rows, :, pos] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Prefill masks cover exactly the prompt; tree steps build their own mask (no HF mask needed).
        # transformers before 5.x's rename passes the cache positions (a tensor of the query's length).
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return query_length, 0

    def get_seq_length(self) -> int:
        # transformers asks this for its mask offsets on every forward; tree forwards use no transformers
        # mask, so the host-side upper bound of the rows' lengths answers without a device sync.
        return 0 if self.owner.mode == "prefill" else self.owner.host_len

    def get_max_length(self) -> int:
        return self.owner.max_len

    get_max_cache_shape = get_max_length  # its name before transformers 5.x renamed it


class TreeCache(Cache):
    """KV cache of a target model for tree speculative decoding (see the module docstring)."""

    def __init__(self, num_layers: int, batch_size: int, max_len: int, device: torch.device):
        self.rows = batch_size  # (Cache.batch_size is a read-only property)
        self.max_len = max_len
        self.mode = "prefill"
        self.lens = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self._lens_copies = {}  # device -> lens there, for layers on other devices (device_map="auto")
        self.host_len = 0  # an upper bound of max(lens), kept on the host
        super().__init__(layers=[TreeCacheLayer(self) for _ in range(num_layers)])

    def lens_on(self, device: torch.device) -> torch.Tensor:
        """``lens`` on a layer's device: each layer's cache lives where the layer runs."""
        if device == self.lens.device:
            return self.lens
        if device not in self._lens_copies:
            self._lens_copies[device] = self.lens.to(device)
        return self._lens_copies[device]

    def _set_lens(self, new: torch.Tensor) -> None:
        self.lens.copy_(new)
        self._lens_copies.clear()

    def _by_device(self) -> dict:
        """{device: (keys, values)} of the initialised layers."""
        groups = {}
        for layer in self.layers:
            if layer.is_initialized:
                k, v = groups.setdefault(layer.keys.device, ([], []))
                k.append(layer.keys)
                v.append(layer.values)
        return groups

    @torch.no_grad()
    def unpad_(self, prompt_len: int, pad_left: torch.Tensor) -> None:
        """After a left-padded prefill of width ``prompt_len``: row b drops its ``pad_left[b]`` pad slots."""
        idx = (torch.arange(prompt_len, device=pad_left.device).unsqueeze(0) + pad_left.unsqueeze(1)).clamp(
            max=prompt_len - 1
        )  # (B, P): new position j takes old position j + pad
        rows = torch.arange(self.rows, device=idx.device).unsqueeze(1).expand_as(idx)
        for device, (keys, values) in self._by_device().items():
            r, i = rows.to(device), idx.to(device)
            for t in (*keys, *values):
                t[:, :, :prompt_len] = t[r, :, i].transpose(1, 2)
        self._set_lens(prompt_len - pad_left)
        self.host_len = prompt_len
        self.mode = "tree"

    @torch.no_grad()
    def compact_(self, accept_path: torch.Tensor, accept_len: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Keeps the accepted tree entries (root first) and advances ``lens`` by ``accept_len + 1``.

        Rows where ``active`` is False (finished rows) keep their length, so they never outgrow the cache.
        """
        new_lens = None
        for device, (keys, values) in self._by_device().items():  # one call per device: all its layers at once
            new = ops.compact_kv_(keys, values, self.lens_on(device), accept_path.to(device), accept_len.to(device))
            new_lens = new.to(self.lens.device) if new_lens is None or device == self.lens.device else new_lens
        if new_lens is None:
            return
        self._set_lens(new_lens if active is None else torch.where(active, new_lens, self.lens))
        self.host_len = min(self.host_len + accept_path.shape[1], self.max_len)  # at most the whole path per row

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if self.layers else 0
