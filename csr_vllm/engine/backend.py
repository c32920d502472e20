"""The CSR attention backend for vLLM's CPU path.

Subclasses vLLM's ``CPU_ATTN`` backend: same metadata, same kernel, different pages. vLLM's
block manager sizes pages from :meth:`CSRAttentionBackend.customize_spec`: a ``uint8`` page of
``H x block_size`` slots of C bytes, C = the packed key code + value code (layout in
:mod:`csr_vllm.engine.page_layout`), so the same KV memory admits ``2 * D * 2 / C`` times the
tokens of bf16.

Write path (``do_kv_cache_update``): encode the step's new K/V and store codes; Guard copies.
Read path, behind ``read_path``:

* ``reconstruct``: decode the referenced pages into a scratch dense paged buffer, overlay the
  exact data (outliers, the dense window, the step's own tokens, so a chunk attends to itself
  exactly) and run vLLM's own CPU attention kernel over a remapped block table.
* ``sparse``: decode rows go through attention in the sparse domain
  (:mod:`csr_vllm.engine.sparse_attention`); prefill rows as ``reconstruct``.

The dictionaries and settings are chosen when the platform selects this backend
(:mod:`csr_vllm.plugin`), before any spec exists: ``customize_spec`` runs where vLLM's current
config is not set, so the slot size comes from the class state set at selection.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.search import SearchSpec, ordered_for_search
from csr_vllm.engine.backend_spec import CSRBackendSpec, layer_index, metadata_of
from csr_vllm.engine.guard import OutlierGuard
from csr_vllm.engine.native_path import dictionaries_for
from csr_vllm.engine.page_layout import with_adaptation
from csr_vllm.engine.runtime import CSRRuntime, StepPlan
from csr_vllm.engine.settings import CSRSettings

logger = init_logger("vllm.csr_vllm.backend")


class CSRAttentionBackend(CSRBackendSpec, CPUAttentionBackend):
    """CPU attention over CSR index/weight pages."""

    @classmethod
    def configure(cls, dicts: DictionarySet, settings: CSRSettings) -> None:
        # Ordered for a screened search once adaptation has reserved its atoms (the set the
        # runtime then finds ordered already), in bf16 when the native kernels will serve
        # them: the class holds only the set the engine uses.
        dicts = ordered_for_search(with_adaptation(dicts, settings.adapt_atoms),
                                   SearchSpec.parse(settings.search))
        dicts = dictionaries_for(dicts, settings)
        super().configure(dicts, settings)

    @staticmethod
    def get_impl_cls() -> type[CSRAttentionImpl]:
        return CSRAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CSRMetadataBuilder]:
        return CSRMetadataBuilder


@dataclass
class CSRMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus this step's CSR plan and the engine's runtime."""

    csr_plan: StepPlan | None = None
    csr_runtime: CSRRuntime | None = None
    csr_prefill_scheduler_metadata: torch.Tensor | None = None


class CSRMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first, so the sparse read path takes one leading slice of the batch.
        self._init_reorder_batch_threshold(1)
        dicts, settings = CSRAttentionBackend.dicts, CSRAttentionBackend.settings
        self.runtime = CSRRuntime(dicts, settings, kv_cache_spec.block_size,
                                  vllm_config.model_config.dtype)
        _RUNTIMES.add(self.runtime)
        if self.runtime.native_off:
            logger.info("CSR kernels: the PyTorch reference (%s)", self.runtime.native_off)
        else:
            logger.info("CSR kernels: native CPU (csr_vllm.native)")
        side = self.runtime.side_bytes()
        logger.info(
            "CSR KV cache: %d bytes per (token, KV head) slot (bf16: %d), %.3f bits/channel "
            "(sampled atoms included); "
            "side memory outside the pool: dictionaries %.1f MiB, dense window guard %.1f MiB "
            "(%d blocks), outlier guard up to %.1f MiB",
            self.runtime.layout.slot_bytes, 4 * dicts.shape.head_dim,
            8 * self.runtime.layout.slot_bytes / (2 * dicts.shape.head_dim),
            side["dictionaries"] / 2**20, side["window_guard"] / 2**20,
            self.runtime.window.capacity,
            _outlier_reserved(dicts, settings, vllm_config.model_config.dtype) / 2**20)
        dense = self.runtime.dense
        if dense:
            n, slot = len(dicts.layers), self.runtime.layout.slot_bytes
            all_in = (n * slot + dense.bytes_per_token() / dicts.kv_heads) / (n * 2 * dicts.shape.head_dim)
            logger.info(
                "CSR dense layers %s: K/V kept exactly (%d bytes per token beside the pool, "
                "allocated with it); all-in %.3f bits/channel over %d layers",
                sorted(dense.layers), dense.bytes_per_token(), 8 * all_in, n)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CSRMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = self.runtime.plan(base.block_table, common_attn_metadata.seq_lens,
                                 common_attn_metadata.query_start_loc_cpu, base.slot_mapping,
                                 sparse_decodes=self._sparse_decodes(common_attn_metadata))
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        rest = None
        nd = plan.num_decodes
        if 0 < nd < common_attn_metadata.num_reqs:  # scheduler metadata of the prefill rows
            qsl = common_attn_metadata.query_start_loc_cpu
            rest = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=common_attn_metadata.num_reqs - nd, num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                seq_lens=base.seq_lens[nd:], dtype=self.dtype,
                query_start_loc=qsl[nd:] - qsl[nd], causal=base.causal,
                sliding_window_size=-1, isa=self.isa, enable_kv_split=False,
                dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype)
        return CSRMetadata(**fields, csr_plan=plan, csr_runtime=self.runtime,
                           csr_prefill_scheduler_metadata=rest)

    def _sparse_decodes(self, common: CommonAttentionMetadata) -> bool:
        """Whether decode rows take the sparse read path this step."""
        runtime = self.runtime
        if runtime.dicts.config.per_head:
            return False
        path = runtime.settings.read_path
        if path == "auto":
            return runtime.auto_sparse(int(common.max_seq_len))
        return path == "sparse"


# Runtimes of this process (normally one), for worker-side statistics (collective_rpc). Weak:
# a runtime lives exactly as long as the builder vLLM keeps for its KV cache group.
_RUNTIMES: weakref.WeakSet[CSRRuntime] = weakref.WeakSet()


def runtimes() -> list[CSRRuntime]:
    return list(_RUNTIMES)


def _outlier_reserved(dicts: DictionarySet, settings: CSRSettings, dtype: torch.dtype) -> int:
    """Upper bound of the outlier pools: one per layer and tensor, allocated on first use."""
    if not settings.outlier_threshold:
        return 0
    per_pool = OutlierGuard.bytes_for(settings.outlier_capacity, dicts.shape.head_dim, dtype)
    return 2 * len(dicts.layers) * per_pool  # this worker's layers (pipeline stage)


class CSRAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = [
            what for what, bad in (
                (f"attention type {attn_type!r}", attn_type != AttentionType.DECODER),
                (f"sliding window {sliding_window}", sliding_window is not None),
                ("ALiBi", alibi_slopes is not None),
                ("logits soft-capping", bool(logits_soft_cap)),
                ("attention sinks", sinks is not None),
                ("KV sharing across layers", kv_sharing_target_layer_name is not None),
            ) if bad
        ]
        if unsupported:
            raise NotImplementedError(
                "the CSR KV cache supports causal decoder self-attention only; this model "
                f"has {', '.join(unsupported)}. Run it without --kv-cache-backend csr.")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        meta = metadata_of(layer)
        if meta is None or meta.csr_plan is None:
            return
        meta.csr_runtime.write(layer_index(layer), meta.csr_plan, key, value, kv_cache,
                               slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by CSR")
        if attn_metadata is None:  # profiling / warm-up
            return output
        plan, runtime = attn_metadata.csr_plan, attn_metadata.csr_runtime
        layer_idx = layer_index(layer)
        n = attn_metadata.num_actual_tokens
        nd = plan.num_decodes
        if nd:
            runtime.sparse_decode(layer_idx, plan, query, key, value, kv_cache, self.scale,
                                  output)
        if nd == len(plan.seq_lens):
            return output
        # Reconstruct-then-kernel for the rest (all rows when the sparse path is off).
        k, v = runtime.dense_view(layer_idx, plan, key, value, kv_cache)
        bs = runtime.block_size
        r, h, d = len(plan.ref_blocks), self.num_kv_heads, self.head_size
        scratch = torch.empty(r, h, 2 * bs, d, dtype=k.dtype)
        stats = runtime.stats
        stats.scratch_bytes_peak = max(stats.scratch_bytes_peak,
                                       scratch.nbytes + k.nbytes + v.nbytes)
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            k, v, key_cache, value_cache, torch.arange(r * bs, dtype=torch.long),
            layer.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        sched = attn_metadata.scheduler_metadata
        t0 = 0
        if nd:
            t0 = int(qsl[nd])
            qsl, seq_lens = qsl[nd:] - qsl[nd], seq_lens[nd:]
            sched = attn_metadata.csr_prefill_scheduler_metadata
        ops.cpu_attention_with_kv_cache(
            query=query[t0:n], key_cache=key_cache, value_cache=value_cache,
            output=output[t0:n], query_start_loc=qsl, seq_lens=seq_lens, scale=self.scale,
            causal=attn_metadata.causal, alibi_slopes=None, sliding_window=-1,
            block_table=plan.scratch_table[nd:], softcap=0, scheduler_metadata=sched,
            s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        return output
