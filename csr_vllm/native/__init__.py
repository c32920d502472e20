"""Native CPU kernels of the CSR KV cache (a torch C++ extension, ops ``csr_cpu::*``).

Built from ``csrc/csr_cpu.cpp`` by ``python -m csr_vllm.native build`` (the Makefile's set-up
runs it) or on first use, into ``<cache>/native/<key>`` (key: source, torch version and this
CPU's instruction sets, since it is compiled with ``-march=native``, or the target named by
``CSR_VLLM_NATIVE_MARCH``). A failed build warns once
and :func:`load` returns None: callers then use the PyTorch reference, never crash.

Ops (shapes in the project's notation; formats as :func:`format_ints`):

* ``encode_store(x [N, H, D], positions [N], cos, sin [P, D], atoms [A, D], atoms_t,
  corr_scale, ladder [S, M], kv_cache!, slots [N], fmt, omp, undo_rope, centroids [K, D]?,
  cluster_offsets [K + 1]?, probes) -> rel_err [N, H]``; ``atoms_t`` the correlation table
  (:func:`correlation_table`); ``probes > 0``: a screened search
  (:mod:`csr_vllm.codec.search`) over atoms ordered by cluster
* ``decode_dense(kv_cache, blocks [R], counts [R], pos0 [R], key_fmt, value_fmt, key_atoms,
  key_ladder, value_atoms, value_ladder, cos, sin, apply_rope, out_k!, out_v! [R*BS, H, D])``
* ``decode_attention(query [N, Hq, D], kv_cache, block_table [B, M], seq_lens [B], rows [B],
  key_fmt, value_fmt, ..., win_store [cap, H, BS, 2, D], win_index [B, W], own_k, own_v
  [N, H, D], scale, output! [N, Hq, D])``
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from csr_vllm.codec.config import TensorCodecConfig
from csr_vllm.paths import cache_root

logger = logging.getLogger("vllm.csr_vllm.native")

SOURCE = Path(__file__).parent / "csrc" / "csr_cpu.cpp"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "ops" -> namespace or None, "error" -> str


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# The instruction sets the build targets: ``native`` (this CPU's) unless this names another
# ``-march`` (e.g. ``x86-64-v3``, AVX2 only: a build for a fleet of older CPUs, and how the
# tests check the portable kernels on a CPU with AVX-512).
MARCH_ENV = "CSR_VLLM_NATIVE_MARCH"


def march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def build_dir() -> Path:
    """Where this source, torch, CPU and target's build lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + _cpu_flags().encode() + march().encode()).hexdigest()[:16]
    return cache_root() / "native" / key


def _build(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="csr_cpu", sources=[str(SOURCE)], build_directory=str(out),
        extra_cflags=["-O3", f"-march={march()}", "-fopenmp", "-ffp-contract=fast"],
        extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)


def load(verbose: bool = False):
    """The ``torch.ops.csr_cpu`` namespace, building the extension on first use; None (with
    one warning per process) when it cannot be built or loaded here."""
    with _LOCK:
        if "ops" not in _STATE:
            try:
                if os.environ.get("CSR_VLLM_NATIVE_DISABLE"):  # for testing the fallback
                    raise RuntimeError("disabled by CSR_VLLM_NATIVE_DISABLE")
                _build(verbose)
                _register_fakes()
                _STATE["ops"] = torch.ops.csr_cpu
            except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
                _STATE["ops"], _STATE["error"] = None, f"{type(e).__name__}: {e}"
                warnings.warn(f"csr-vllm: the native CPU kernels are unavailable "
                              f"({_STATE['error'].splitlines()[0][:300]}); using the PyTorch "
                              "reference (slower, same results)", RuntimeWarning, stacklevel=2)
        return _STATE["ops"]


def error() -> str | None:
    """Why :func:`load` returned None (None if it did not, or was not called)."""
    return _STATE.get("error")  # type: ignore[return-value]


def _register_fakes() -> None:
    """Shape-only implementations, so traced code (torch.compile) can pass through the ops."""
    def encode_fake(x, positions, cos, sin, atoms, atoms_t, corr_scale, ladder, kv_cache, slots,
                    fmt, omp, undo_rope, centroids=None, cluster_offsets=None, probes=0):
        return x.new_empty(x.shape[:2], dtype=torch.float32)

    def nothing(*args, **kwargs):
        return None

    for name, fn in (("csr_cpu::encode_store", encode_fake),
                     ("csr_cpu::decode_dense", nothing),
                     ("csr_cpu::decode_attention", nothing)):
        with contextlib.suppress(RuntimeError):  # already registered in this process
            torch.library.register_fake(name)(fn)


# Coefficient kinds of the C++ side.
_KINDS = {"fp16": 0, "fp8": 1} | {f"log{b}": 2 for b in range(3, 7)}


def unsupported(config: TensorCodecConfig) -> str | None:
    """Why the native kernels cannot code ``config`` (None: they can)."""
    if config.chunks != 1:
        return f"{config.chunks} chunks per vector"
    if config.coef not in _KINDS:
        return f"coefficient format {config.coef!r}"
    if config.sampled_atoms:
        return "sampled atoms (dictionary adaptation)"
    if config.atoms_per_chunk > 64 or config.slot_bytes > 192:
        return f"{config.atoms_per_chunk} atoms per vector"
    return None


def format_ints(config: TensorCodecConfig, byte_offset: int) -> list[int]:
    """[byte offset, S, coefficient kind, coefficient bits, index bits, code bytes, ladder
    octaves (logB; else 0)]."""
    fmt = config.coef_format
    return [byte_offset, config.atoms_per_chunk, _KINDS[config.coef], fmt.bits,
            config.index_bits, config.slot_bytes, fmt.octaves if fmt.uses_ladder else 0]


def correlation_table(atoms: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's correlation table of atoms [A, D] float32, and its scale tensor:

    * ``fp32``: [D, A] float32 (exact), no scale;
    * ``bf16``: [D/2, A, 2] bf16 channel pairs (AVX512-BF16), no scale;
    * ``int8``: [D/4, A, 4] uint8 channel quads (AVX512-VNNI), each entry its atom's int8
      value + 128, with [A] float32: each atom's scale (its largest magnitude / 127);
    * ``int8-blocked``: the same entries as [A/16, D/4, 16, 4] (AVX2's vpmaddubsw; AMX's B
      tiles, 64 channels of a 16-atom group per tile), A padded
      to a multiple of 16 with zero atoms (scale 0), the scale [A padded].

    ``int8``: a 64-byte line holds one channel quad of 16 atoms (one SIMD register's lanes), so
    a pass over 16 atoms reads D/4 lines A * 4 bytes apart. ``int8-blocked``: a 16-atom group's
    channels in consecutive lines (one contiguous D * 16 bytes a pass): on AVX-512 (Sapphire
    Rapids) as fast as ``int8`` for one token and 25% slower from 48 rows up, so VNNI keeps
    ``int8``; on AVX2 (Zen 3) faster for the encoder alone, within the machine's spread through
    a decode step (docs/results.md, *AVX2: the blocked int8 table*). bf16 and int8 candidates
    are rescored in fp32 against ``atoms``."""
    a, d = atoms.shape
    if layout == "fp32":
        return atoms.t().contiguous(), torch.empty(0)
    if layout == "bf16":
        return atoms.to(torch.bfloat16).reshape(a, d // 2, 2).permute(1, 0, 2).contiguous(), \
            torch.empty(0)
    if layout not in ("int8", "int8-blocked"):
        raise ValueError(f"unknown correlation layout {layout!r}")
    scale = atoms.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    q = (torch.round(atoms / scale[:, None]).clamp(-127, 127) + 128).to(torch.uint8)
    if layout == "int8":
        return q.reshape(a, d // 4, 4).permute(1, 0, 2).contiguous(), scale
    pad = -a % 16
    q = torch.cat([q, torch.full((pad, d), 128, dtype=torch.uint8)])
    blocked = q.reshape((a + pad) // 16, 16, d // 4, 4).permute(0, 2, 1, 3).contiguous()
    return blocked, torch.cat([scale, torch.zeros(pad)])


# Dictionaries smaller than this are correlated exactly in fp32: they cost little, and a
# quantised table's coarse scores can hide a small residual entry among zeros (a lossless
# dictionary with as many picks as channels would then re-pick a finished atom).
EXACT_BELOW_ATOMS = 1024


def best_layout(ops, head_dim: int, num_atoms: int = 1 << 30, screened: bool = False) -> str:
    """The fastest correlation layout this build takes for ``head_dim`` x ``num_atoms``.

    With AMX the full search takes ``int8-blocked`` (AMX tiles, head_dim 64 / 128 / 256); the
    screened search keeps ``int8`` (its VNNI tiles of rows per cluster)."""
    if num_atoms < EXACT_BELOW_ATOMS:
        return "fp32"
    layouts = correlation_layouts(ops)
    if "amx" in ops.isa() and not screened and head_dim in (64, 128, 256):
        return "int8-blocked"
    for int8 in ("int8", "int8-blocked"):
        if int8 in layouts and head_dim % 4 == 0:
            return int8
    if "bf16" in layouts and head_dim % 2 == 0:
        return "bf16"
    return "fp32"


def correlation_layouts(ops) -> list[str]:
    """The correlation tables this build's encoder takes: fp32 always, bf16 with AVX512-BF16,
    int8 with AVX512-VNNI, int8-blocked with AVX2 (and no VNNI) or AMX."""
    isa = ops.isa()
    return (["fp32"] + ["bf16"] * ("bf16" in isa) + ["int8"] * ("vnni" in isa)
            + ["int8-blocked"] * (isa == "avx2" or "amx" in isa))
