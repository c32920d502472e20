"""Guard-window attention: what a serving engine with a W-token dense window computes.

Every query attends to its most recent ``window`` tokens (itself included) exactly and to all
older tokens through the method's reconstruction. One forward pass per text window: both score
matrices are computed and a distance mask picks, for each (query, key) pair, which one counts.

It plugs into transformers through ``AttentionInterface`` (its public extension point): the
model's own modelling code runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface

from csr_vllm.evaluation.methods import KVMethod


class GuardWindowAttention:
    """Attention function applying ``method`` outside a dense window of ``window`` tokens.

    Supports batch 1 (one sequence) in prefill and in incremental decoding: for methods that
    code vectors independently, reconstructions of already-seen tokens are kept per layer and
    only new tokens are coded, so a token is coded exactly once, as in an engine.
    """

    def __init__(self, method: KVMethod, window: int, sinks: int = 0) -> None:
        if window < 1:
            raise ValueError("the guard window must hold at least the current token (W >= 1)")
        if sinks < 0:
            raise ValueError("sinks must be >= 0")
        self.method = method
        self.window = window
        self.sinks = sinks
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def reset(self) -> None:
        """Forget cached reconstructions (call between sequences)."""
        self._cache.clear()

    def _reconstruct(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        t = keys.shape[1]
        if not self.method.per_vector:
            return self.method.compress(layer, keys, values, torch.arange(t))
        k_old, v_old = self._cache.get(layer, (keys[:, :0], values[:, :0]))
        n = k_old.shape[1]
        if n > t:  # a new, shorter sequence without reset(): start over
            k_old, v_old, n = keys[:, :0], values[:, :0], 0
        if n < t:
            k_new, v_new = self.method.compress(layer, keys[:, n:], values[:, n:],
                                                torch.arange(n, t))
            k_old, v_old = torch.cat([k_old, k_new], 1), torch.cat([v_old, v_new], 1)
            self._cache[layer] = (k_old, v_old)
        return k_old, v_old

    def __call__(self, module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
        """HF attention signature: query [1, Hq, Tq, D], key/value [1, H, Tk, D]."""
        if query.shape[0] != 1:
            raise ValueError("the guard-window harness evaluates one sequence at a time")
        groups = query.shape[1] // key.shape[1]
        k, v = key[0].float(), value[0].float()
        k_hat, v_hat = self._reconstruct(module.layer_idx, k, v)
        tq, tk = query.shape[2], k.shape[1]
        if tq == 1:  # decoding: one query, so the window is a plain split of the key axis
            cut = max(tk - self.window, 0)
            lo = min(self.sinks, cut)
            k_mix = torch.cat([k[:, :lo], k_hat[:, lo:cut], k[:, cut:]], dim=1)[None]
            v_mix = torch.cat([v[:, :lo], v_hat[:, lo:cut], v[:, cut:]], dim=1)[None]
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), k_mix, v_mix, scale=scaling, enable_gqa=groups > 1)
            return out.transpose(1, 2).to(query.dtype), None
        qpos = torch.arange(tk - tq, tk)
        dist = qpos[:, None] - torch.arange(tk)[None, :]  # [Tq, Tk]
        sink = (torch.arange(tk) < self.sinks)[None, :]
        exact = (dist >= 0) & ((dist < self.window) | sink)
        approx = (dist >= self.window) & ~sink

        # One SDPA call over [exact keys ; reconstructed keys]: the mask lets each query see
        # the exact copy inside its window and the reconstruction beyond it.
        mask = torch.cat([exact, approx], dim=1)  # [Tq, 2 Tk]
        k_cat = torch.cat([k, k_hat], dim=1)[None]
        v_cat = torch.cat([v, v_hat], dim=1)[None]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), k_cat, v_cat, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
        out = out.transpose(1, 2).to(query.dtype)  # [1, Tq, Hq, D]
        return out, None


@contextlib.contextmanager
def guard_window_attention(model, method: KVMethod, window: int,
                           sinks: int = 0) -> Iterator[GuardWindowAttention]:
    """Run ``model`` with :class:`GuardWindowAttention` inside the block; restores it after."""
    attn = GuardWindowAttention(method, window, sinks)
    name = f"csr_guard_window_{id(attn)}"
    AttentionInterface.register(name, attn)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield attn
    finally:
        model.set_attn_implementation(previous)
