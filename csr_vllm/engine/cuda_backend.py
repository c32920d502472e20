"""The CSR attention backend for vLLM's CUDA path (Triton kernels, :mod:`csr_vllm.ops`).

Subclasses vLLM's Triton backend (``TRITON_ATTN``): the same metadata plus a CSR section, and
CSR pages (``customize_spec``: ``uint8`` slots of key code + value code, the layout of
:mod:`csr_vllm.engine.page_layout`, so vLLM's block manager admits ``4 D / C`` times the
tokens of bf16). Selected by :mod:`csr_vllm.plugin` on a CUDA platform when
``--kv-cache-backend csr`` is set (it also registers this class as ``CUSTOM``, so
``--attention-backend CUSTOM`` names the same thing).

* Write (``do_kv_cache_update``): fused encode + store (``csr::encode_store``) at
  ``slot_mapping``; keys coded before RoPE are rotated back with the token's position.
* Decode rows (batch reordered decodes-first): ``csr::sparse_decode``, attention in the sparse
  domain over the codes with the in-flight token exact.
* Prefill / continuation rows, one request at a time: its blocks decoded to dense pages
  (``csr::decode_pages``) in a scratch buffer reserved at start, the chunk's own tokens laid
  over them exactly, then vLLM's own ``unified_attention`` over a block table onto the scratch.

Memory held outside vLLM's pool (dictionaries as float32, RoPE tables, the reconstruct scratch
for one ``max_model_len`` request) is allocated when the attention layers are built, that is
before vLLM's memory profiling, so ``gpu_memory_utilization`` accounts for it.

**Unverified**: written in a session without a GPU. The kernels are tested against their
references under Triton's interpreter; this module is tested on CPU only for its wiring
(import, class structure, page spec, settings refusals, selection). Not run on a GPU: an
engine start, the forward paths above, CUDA-graph behaviour (declared ``NEVER`` because the
prefill path loops over requests on the host). Not built on CUDA yet: the dense-window Guard
(exact data is the in-flight tokens only; a warning says so when ``guard_window > 0``), the
outlier Guard (refused), dense layers (refused), per-head dictionaries and sampled atoms (refused), integer
coefficient formats (refused by the kernels; fp8, fp16 and logB are in them).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

import csr_vllm.ops.library  # noqa: F401  (registers torch.ops.csr.*)
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.engine.backend_spec import CSRBackendSpec, layer_index, metadata_of
from csr_vllm.engine.settings import CSRSettings
from csr_vllm.ops.code_format import CodeFormat

logger = init_logger("vllm.csr_vllm.cuda_backend")


def check_cuda_support(dicts: DictionarySet, settings: CSRSettings) -> None:
    """Refuse settings the CUDA path does not implement (clear errors, never wrong output)."""
    if dicts.config.per_head:
        raise NotImplementedError("per-head dictionaries are not in the CUDA kernels yet; use "
                                  "a per-layer dictionary or the CPU backend")
    for tcfg in (dicts.config.key, dicts.config.value):
        CodeFormat.of(tcfg)  # int formats and sampled atoms raise here
    if settings.outlier_threshold > 0:
        raise NotImplementedError("the outlier Guard (--csr-outlier-threshold) is not built "
                                  "on CUDA yet")
    if settings.search != "full":
        raise NotImplementedError(f"the screened search (--csr-search {settings.search}) is "
                                  "a CPU encoder setting, not built in the Triton encoder; "
                                  "use --csr-search full on CUDA")
    from csr_vllm.engine.runtime import resolve_dense_layers

    dense = resolve_dense_layers(dicts, settings)
    if dense:
        # Coding such a layer anyway would be a silent wrong answer (docs/design.md, *Dense
        # layers*): refuse until the Triton path reads a dense store.
        raise NotImplementedError(
            f"dense layers {list(dense)} (this dictionary's recommendation or "
            "--csr-dense-layers) are not built on CUDA yet; use the CPU backend, or pass "
            "--csr-dense-layers '' to code every layer knowingly")
    if settings.read_path == "reconstruct":
        logger.info("CSR on CUDA: read_path=reconstruct sends decode rows through the "
                    "reconstruct path too")


class CSRCudaBackend(CSRBackendSpec, TritonAttentionBackend):
    """vLLM's Triton backend over CSR index/weight pages."""

    @classmethod
    def configure(cls, dicts: DictionarySet, settings: CSRSettings) -> None:
        check_cuda_support(dicts, settings)
        super().configure(dicts, settings)

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[CSRCudaImpl]:
        return CSRCudaImpl

    @staticmethod
    def get_builder_cls() -> type[CSRCudaMetadataBuilder]:
        return CSRCudaMetadataBuilder


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device).contiguous()


DECODE_CHUNK = 64  # decode rows per sparse-decode launch (bounds its reserved workspace)


class DeviceState:
    """One engine's device copies of what every layer reads: dictionaries (float32), code
    formats, RoPE tables, the reconstruct scratch and the kernels' workspaces. Built on the
    engine's first layer (:meth:`get`), so all of it exists before vLLM profiles memory, and
    held by its layers' impls: it goes when they do."""

    def __init__(self, dicts: DictionarySet, device: torch.device, max_model_len: int,
                 block_size: int, dtype: torch.dtype, q_heads: int) -> None:
        from csr_vllm.ops import encode, sparse_decode
        from csr_vllm.ops.encode import rope_rows

        # Held so that id(dicts) in get()'s key names no other dictionary while this lives.
        self.dicts = dicts
        shape = dicts.shape
        h, d = shape.num_kv_heads, shape.head_dim
        self.key_fmt = CodeFormat.of(dicts.config.key)
        self.value_fmt = CodeFormat.of(dicts.config.value)
        self.key_atoms = [dicts.codec("key", i, 0).atoms.to(device, torch.float32).contiguous()
                          for i in range(shape.num_layers)]
        self.value_atoms = [dicts.codec("value", i, 0).atoms.to(device, torch.float32)
                            .contiguous() for i in range(shape.num_layers)]
        # logB codes: each layer's [C, S, M] ladder table (None for fp8 / fp16).
        self.key_ladders, self.value_ladders = (
            [_on(dicts.codec(kind, i, 0).ladder_table(), device)
             for i in range(shape.num_layers)] for kind in ("key", "value"))
        self.pre_rope = dicts.config.key_rope == "pre"
        self.rope_cos = self.rope_sin = None
        if self.pre_rope:
            self.rope_cos, self.rope_sin = rope_rows(torch.arange(max_model_len, device=device),
                                                     d, shape.rope_theta)
        blocks = -(-max_model_len // block_size)
        self.scratch_k = torch.empty(blocks, block_size, h, d, dtype=dtype, device=device)
        self.scratch_v = torch.empty_like(self.scratch_k)
        self.block_size = block_size
        sms = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 4
        widest = max((self.key_fmt, self.value_fmt),
                     key=lambda f: f.atoms_per_chunk * (d // f.chunks))
        self.encode_ws = torch.empty(encode.workspace_floats(4 * sms, widest, d),
                                     dtype=torch.float32, device=device)
        splits = -(-max_model_len // (sparse_decode.MIN_SPLIT_BLOCKS * block_size)) + 1
        self.decode_ws = torch.empty(sparse_decode.workspace_floats(
            DECODE_CHUNK, q_heads, h, d, self.key_fmt, self.value_fmt, splits, self.pre_rope),
            dtype=torch.float32, device=device)

    def nbytes(self) -> int:
        tensors = [*self.key_atoms, *self.value_atoms, self.scratch_k, self.scratch_v,
                   self.encode_ws, self.decode_ws]
        tensors += [t for t in (self.rope_cos, self.rope_sin, *self.key_ladders,
                                *self.value_ladders) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def get(cls, dicts: DictionarySet, device: torch.device, max_model_len: int,
            block_size: int, dtype: torch.dtype, q_heads: int) -> DeviceState:
        """The state for these arguments: the one another layer of the engine already holds,
        else a new one (so a second engine in the process, with other dictionaries or sizes,
        never reads the first one's)."""
        key = (id(dicts), device, max_model_len, block_size, dtype, q_heads)
        state = _STATES.get(key)
        if state is None:
            state = _STATES[key] = cls(dicts, device, max_model_len, block_size, dtype,
                                       q_heads)
            logger.info("CSR on CUDA: %.1f MiB reserved outside the KV pool (dictionaries, RoPE "
                        "tables, reconstruct scratch for one %d-token request, kernel "
                        "workspaces)", state.nbytes() / 2**20, max_model_len)
        return state


# Lookup only, not ownership: the layers' impls hold their engine's state (weak values, so a
# finished engine's device memory is freed with its layers).
_STATES: weakref.WeakValueDictionary[tuple, DeviceState] = weakref.WeakValueDictionary()


@dataclass
class CSRCudaMetadata(TritonAttentionMetadata):
    """vLLM's Triton metadata plus the step's token positions and decode/prefill split."""

    csr_positions: torch.Tensor | None = None  # [num_actual_tokens] on device
    csr_num_decodes: int = 0
    csr_seq_lens_cpu: torch.Tensor | None = None
    csr_query_start_loc_cpu: torch.Tensor | None = None


class CSRCudaMetadataBuilder(TritonAttentionMetadataBuilder):
    # The prefill path loops over requests on the host: not capturable.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first: one leading slice

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CSRCudaMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return csr_metadata(base, common_attn_metadata)


def csr_metadata(base: TritonAttentionMetadata,
                 common: CommonAttentionMetadata) -> CSRCudaMetadata:
    """Add positions and the decode/prefill split to vLLM's metadata."""
    qsl_cpu = common.query_start_loc_cpu.long()
    seq_cpu = common.seq_lens.long().cpu()
    qlens = qsl_cpu[1:] - qsl_cpu[:-1]
    num_decodes = int((qlens == 1).cumprod(0).sum()) if len(qlens) else 0
    n = int(qsl_cpu[-1]) if len(qsl_cpu) else 0
    dev = common.seq_lens.device
    req = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
    offset = torch.arange(n) - qsl_cpu[req]
    positions = (seq_cpu - qlens)[req] + offset
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return CSRCudaMetadata(**fields, csr_positions=positions.to(dev, non_blocking=True),
                           csr_num_decodes=num_decodes, csr_seq_lens_cpu=seq_cpu,
                           csr_query_start_loc_cpu=qsl_cpu)


class CSRCudaImpl(TritonAttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **kwargs) -> None:
        unsupported = [what for what, bad in (
            (f"attention type {attn_type!r}", attn_type != AttentionType.DECODER),
            (f"sliding window {sliding_window}", sliding_window is not None),
            ("ALiBi", alibi_slopes is not None),
            ("logits soft-capping", bool(logits_soft_cap)),
            ("attention sinks", sinks is not None),
            ("KV sharing across layers", kv_sharing_target_layer_name is not None),
            (f"kv_cache_dtype {kv_cache_dtype!r}", kv_cache_dtype != "auto"),
        ) if bad]
        if unsupported:
            raise NotImplementedError(
                "the CSR KV cache supports causal decoder self-attention only; this model "
                f"has {', '.join(unsupported)}. Run it without --kv-cache-backend csr.")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **kwargs)
        dicts, settings = CSRCudaBackend.dicts, CSRCudaBackend.settings
        if dicts is None:
            raise RuntimeError("CSR CUDA backend used before csr_vllm.plugin configured it")
        if settings.guard_window > 0:
            logger.warning_once(
                "CSR on CUDA: the dense-window Guard is not built yet; only the in-flight "
                "tokens are exact (guard_window=%d ignored)", settings.guard_window)
        cfg = get_current_vllm_config()
        # Reserved here, while the model is built: before vLLM profiles memory.
        self.state = DeviceState.get(dicts, torch.device("cuda", torch.cuda.current_device()),
                                     cfg.model_config.max_model_len, cfg.cache_config.block_size,
                                     cfg.model_config.dtype, num_heads)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        meta = metadata_of(layer)
        if meta is None:
            return
        st, i = self.state, layer_index(layer)
        n = meta.num_actual_tokens
        cos = sin = None
        if st.pre_rope:
            pos = meta.csr_positions[:n]
            cos, sin = st.rope_cos[pos].contiguous(), st.rope_sin[pos].contiguous()
        torch.ops.csr.encode_store(key[:n], value[:n], slot_mapping[:n], kv_cache,
                                   st.key_atoms[i], st.value_atoms[i], st.key_fmt.to_ints(),
                                   st.value_fmt.to_ints(), cos, sin, st.encode_ws,
                                   st.key_ladders[i], st.value_ladders[i])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by CSR")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        st, i = self.state, layer_index(layer)
        meta: CSRCudaMetadata = attn_metadata
        nd = meta.csr_num_decodes
        if CSRCudaBackend.settings.read_path == "reconstruct":
            nd = 0
        hq, d = self.num_heads, self.head_size
        out3 = output.view(output.shape[0], hq, d)
        for r0 in range(0, nd, DECODE_CHUNK):  # decode rows, sparse domain
            r1 = min(nd, r0 + DECODE_CHUNK)
            res = torch.ops.csr.sparse_decode(
                query[r0:r1], kv_cache, meta.block_table[r0:r1], meta.seq_lens[r0:r1],
                torch.ones(r1 - r0, dtype=torch.int32, device=query.device),
                key[r0:r1, None], value[r0:r1, None],  # the in-flight tokens, exact
                st.key_atoms[i], st.value_atoms[i], st.key_fmt.to_ints(),
                st.value_fmt.to_ints(), self.scale, st.rope_cos, st.rope_sin,
                int(meta.csr_seq_lens_cpu[r0:r1].max()), 0, st.decode_ws, st.key_ladders[i],
                st.value_ladders[i])
            out3[r0:r1] = res.to(output.dtype)
        qsl, seqs = meta.csr_query_start_loc_cpu, meta.csr_seq_lens_cpu
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        bs = st.block_size
        for r in range(nd, len(seqs)):
            q0, q1, t = int(qsl[r]), int(qsl[r + 1]), int(seqs[r])
            nb = -(-t // bs)
            blocks = meta.block_table[r, :nb]
            sk, sv = st.scratch_k[:nb], st.scratch_v[:nb]
            pos0 = torch.arange(nb, device=query.device) * bs
            torch.ops.csr.decode_pages(kv_cache, blocks, st.key_atoms[i], st.value_atoms[i],
                                       st.key_fmt.to_ints(), st.value_fmt.to_ints(), sk, sv,
                                       pos0 if st.pre_rope else None, st.rope_cos, st.rope_sin,
                                       st.key_ladders[i], st.value_ladders[i])
            own = torch.arange(t - (q1 - q0), t, device=query.device)  # the chunk, exact
            sk.view(-1, *sk.shape[2:])[own] = key[q0:q1].to(sk.dtype)
            sv.view(-1, *sv.shape[2:])[own] = value[q0:q1].to(sv.dtype)
            unified_attention(
                q=query[q0:q1], k=sk, v=sv, out=out3[q0:q1],
                cu_seqlens_q=torch.tensor([0, q1 - q0], dtype=torch.int32, device=query.device),
                max_seqlen_q=q1 - q0,
                seqused_k=torch.tensor([t], dtype=torch.int32, device=query.device),
                max_seqlen_k=t, softmax_scale=self.scale, causal=True, window_size=(-1, -1),
                block_table=torch.arange(nb, dtype=torch.int32, device=query.device)[None],
                softcap=0, q_descale=None, k_descale=None, v_descale=None)
        return output
