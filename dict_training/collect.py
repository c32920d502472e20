"""Collect K and V head vectors from a model with forward hooks (no forked model code).

Hooks on each attention layer's ``k_proj``/``v_proj`` see the pre-RoPE keys and the values;
post-RoPE keys are the same keys rotated with the model's RoPE tables at their positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from csr_vllm.codec.dictionary import ModelShape
from csr_vllm.codec.rope import apply_rope, rope_tables


@dataclass
class KVSample:
    """Collected vectors: keys/values [L, N, H, D] (N tokens), float16 to halve memory."""

    keys: Tensor
    values: Tensor
    key_rope: str
    num_tokens: int


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in order."""
    layers = model.model.layers
    mods = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None or not hasattr(m, "k_proj") for m in mods):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected "
                         "decoder layers with self_attn.k_proj / v_proj")
    return mods


@torch.inference_mode()
def collect_kv(model, token_windows: list[Tensor], key_rope: str = "pre",
               progress: bool = True) -> KVSample:
    """Run ``model`` over windows [T] of token ids and gather every layer's K and V.

    Args:
        model: a transformers causal LM (Llama-style attention).
        token_windows: 1-D token id tensors; each is one forward pass at positions 0..T-1.
        key_rope: ``pre`` keeps keys as ``k_proj`` emits them, ``post`` applies RoPE.
    """
    shape = ModelShape.from_hf_config(model.config)
    mods = attention_modules(model)
    store: dict[tuple[int, str], list[Tensor]] = {}

    def hook(layer: int, kind: str):
        def fn(_module, _inp, out):
            store.setdefault((layer, kind), []).append(
                out[0].reshape(out.shape[1], shape.num_kv_heads, shape.head_dim).to(torch.float16)
            )
        return fn

    handles = []
    for i, m in enumerate(mods):
        handles.append(m.k_proj.register_forward_hook(hook(i, "k")))
        handles.append(m.v_proj.register_forward_hook(hook(i, "v")))
    try:
        for ids in tqdm(token_windows, desc="collect K/V", disable=not progress):
            model(ids[None])
    finally:
        for h in handles:
            h.remove()

    keys = torch.stack([torch.cat(store[(i, "k")]) for i in range(len(mods))])
    values = torch.stack([torch.cat(store[(i, "v")]) for i in range(len(mods))])
    if key_rope == "post":
        pos = torch.cat([torch.arange(len(w)) for w in token_windows])
        cos, sin = rope_tables(shape.head_dim, shape.rope_theta, pos)
        # [L, N, H, D]: rotate per token position.
        keys = apply_rope(keys.float(), cos[None, :, None], sin[None, :, None]).to(torch.float16)
    return KVSample(keys, values, key_rope, sum(len(w) for w in token_windows))


def token_windows(tokenizer, text: str, window: int, count: int, offset_tokens: int = 0,
                  bos: bool = True) -> list[Tensor]:
    """Cut ``count`` consecutive windows of ``window`` tokens from ``text``.

    Each window starts with BOS (when the tokenizer has one) as a fresh document would.
    """
    ids = tokenizer(text[: (offset_tokens + window * count) * 8], add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[offset_tokens:], dtype=torch.long)
    body = window - (1 if bos and tokenizer.bos_token_id is not None else 0)
    out = []
    for k in range(count):
        chunk = ids[k * body : (k + 1) * body]
        if len(chunk) < body:
            break
        if body < window:
            chunk = torch.cat([torch.tensor([tokenizer.bos_token_id]), chunk])
        out.append(chunk)
    if len(out) < count:
        raise ValueError(f"text holds only {len(out)} windows of {window} tokens, {count} requested")
    return out
