"""What every CSR attention backend (CPU and CUDA) tells vLLM about its pages.

Mixed in before vLLM's own backend class, so vLLM's block manager sizes the pool from the
CSR slot (``customize_spec``) whichever kernel reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import AttentionSpec

from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.engine.page_layout import SlotLayout
from csr_vllm.engine.settings import CSRSettings


class CSRBackendSpec:
    """Dictionaries, settings and the slot layout of a CSR backend (one engine per process)."""

    # Set by csr_vllm.plugin when the platform selects the backend.
    dicts: ClassVar[DictionarySet | None] = None
    settings: ClassVar[CSRSettings | None] = None
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def configure(cls, dicts: DictionarySet, settings: CSRSettings) -> None:
        cls.dicts, cls.settings = dicts, settings

    @classmethod
    def layout(cls, block_size: int | None = None) -> SlotLayout:
        """The slot; with sampled atoms their share depends on the block size."""
        if cls.dicts is None:
            raise RuntimeError(f"{cls.__name__} used before csr_vllm.plugin configured it")
        return SlotLayout.of(cls.dicts, block_size)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # uint8 pages of slot_bytes per (token, KV head): vLLM's block count then grows by the
        # compression ratio with no change to its allocator.
        if spec.state_content_bytes is not None:
            return spec
        return dataclasses.replace(spec, dtype=torch.uint8,
                                   state_content_bytes=cls.layout(spec.block_size).slot_bytes)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


def layer_index(layer: torch.nn.Module) -> int:
    """The decoder layer an attention module belongs to (cached on the module)."""
    idx = getattr(layer, "_csr_layer_index", None)
    if idx is None:
        idx = layer._csr_layer_index = extract_layer_index(layer.layer_name)
    return idx


def metadata_of(layer: torch.nn.Module) -> Any:
    """This step's attention metadata for ``layer`` (None during profiling / dummy runs)."""
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):
        meta = meta[0]
    if isinstance(meta, dict):
        meta = meta.get(layer.layer_name)
    return meta
