"""Perplexity of a model on a text with its KV cache stored by a given method."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from csr_vllm.dict_training.collect import token_windows
from csr_vllm.evaluation.attention import guard_window_attention
from csr_vllm.evaluation.methods import KVMethod


@dataclass
class PerplexityResult:
    method: str
    bits_per_channel: float
    perplexity: float
    nll: float
    tokens: int
    windows: int
    window_tokens: int
    guard: int
    sinks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def window_nlls(model, windows: list[torch.Tensor], method: KVMethod | None, guard: int,
                progress: bool = True, sinks: int = 0) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per window; ``method=None`` runs the model untouched."""
    out = []
    for ids in tqdm(windows, desc=method.name if method else "model", disable=not progress):
        if method is None:
            logits = model(ids[None]).logits
        else:
            with guard_window_attention(model, method, guard, sinks):
                logits = model(ids[None]).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="sum")
        out.append((float(nll), len(ids) - 1))
    return out


def perplexity(model, tokenizer, text: str, method: KVMethod, guard: int,
               window: int = 2048, max_windows: int = 8, progress: bool = True,
               sinks: int = 0) -> PerplexityResult:
    """Perplexity over ``max_windows`` consecutive ``window``-token windows of ``text``.

    ``sinks`` first tokens of each window are kept exact too (attention sinks; off by default:
    the harness's view is exactly "recent ``guard`` tokens exact, everything older compressed").
    """
    windows = token_windows(tokenizer, text, window, max_windows)
    per = window_nlls(model, windows, method, guard, progress, sinks)
    nll = sum(n for n, _ in per)
    tokens = sum(t for _, t in per)
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)
    return PerplexityResult(method.name, method.bits_per_channel(head_dim),
                            math.exp(nll / tokens), nll / tokens, tokens, len(windows),
                            window, guard, sinks)
