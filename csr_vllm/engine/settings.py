"""What a user asks of the CSR KV cache, validated once at the edge.

Settings reach every vLLM process through ``additional_config`` (the only engine field that
is both free-form and part of the config hash)::

    {"kv_cache_backend": "csr",
     "csr": {"dict": "/path/to/dict", "preset": "csr-2b", "guard_window": 128, ...}}

``vllm serve --kv-cache-backend csr --csr-dict DIR --csr-preset NAME`` is folded into exactly
this by :mod:`csr_vllm.plugin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from csr_vllm.codec.config import DEFAULT_PRESET, PRESETS
from csr_vllm.codec.search import SearchSpec

BACKEND_NAME = "csr"

ReadPath = Literal["auto", "reconstruct", "sparse"]
Kernels = Literal["native", "reference"]


class CSRSettings(BaseModel):
    """Typed CSR settings (the ``csr`` object of ``additional_config``).

    Attributes:
        dictionary: (key ``dict``) dictionary folder (``csr-vllm train-dict`` output); None = the default dictionary
            of the default model, trained on first use.
        preset: bit budget (``csr-1b`` .. ``csr-4b``); None = the dictionary's own setting.
        guard_window: W, the most recent tokens of each sequence read exactly (dense). 128 is
            the window every quality figure of the foundation was measured with.
        guard_max_seqs: sequences whose window the dense pool holds at once; the pool has
            ``guard_max_seqs * (ceil(W / block_size) + 1)`` blocks. Past that, the least
            recently used window blocks are dropped and those tokens are read compressed.
        outlier_threshold: relative reconstruction error above which a vector is also kept
            exactly in the per-layer outlier pool (0 = never).
        outlier_capacity: vectors per layer and tensor in the outlier pool (ring; oldest out).
        read_path: ``reconstruct`` (decode pages, vLLM's kernel), ``sparse`` (attention in the
            sparse domain for decode rows), ``auto`` (the faster one for the shape).
        kernels: ``native`` (the C++ CPU kernels of :mod:`csr_vllm.native`, where they
            implement the setting and build here; else the reference, said once at start) or
            ``reference`` (the plain-PyTorch codec, the spec the native kernels are tested
            against).
        adapt_atoms: E, atoms per KV block (and tensor) sampled from the block's own K/V to
            extend the dictionary for it (:mod:`csr_vllm.codec.adaptation`); their bytes are
            added to every slot (the pool holds fewer tokens). 0 = off (default: measured
            gains do not pay for the bytes, see README).
        dense_layers: layers whose K/V are kept exactly in the model's dtype (side memory
            that grows with the pool, :mod:`csr_vllm.engine.dense_layers`); None = what the
            dictionary's manifest recommends (``info.dense_layers``), [] = none.
        search: which atoms each pick of the encoder looks at: ``full`` (every atom, the
            default) or ``K/P``, the atoms of the P of K clusters nearest the residual
            (:mod:`csr_vllm.codec.search`; e.g. ``256/32`` looks at ~15% of the atoms, for
            a measured rise in the codes' error, docs/results.md *Screened search*).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    dictionary: str | None = Field(None, alias="dict")
    preset: str | None = DEFAULT_PRESET
    guard_window: int = Field(128, ge=0)
    guard_max_seqs: int = Field(16, ge=1)
    outlier_threshold: float = Field(0.0, ge=0.0)
    outlier_capacity: int = Field(4096, ge=0)
    read_path: ReadPath = "auto"
    kernels: Kernels = "native"
    adapt_atoms: int = Field(0, ge=0, le=64)
    dense_layers: tuple[int, ...] | None = None
    search: str = "full"

    @field_validator("search")
    @classmethod
    def _search_spec(cls, v: str) -> str:
        return str(SearchSpec.parse(v))  # raises ValueError with the accepted forms

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown CSR preset {v!r}; valid presets: {', '.join(PRESETS)}")
        return v

    @field_validator("dense_layers")
    @classmethod
    def _layer_indices(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError(f"dense_layers must be layer indices >= 0, got {list(v)}")
        return None if v is None else tuple(sorted(set(v)))

    @field_validator("dictionary")
    @classmethod
    def _dict_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"CSR dictionary folder {v!r} does not exist")
        return None if v is None else str(Path(v).expanduser().resolve())


class CSRConfigError(ValueError):
    """Bad CSR settings in ``additional_config`` (raised before any model is loaded)."""


def settings_from_additional_config(additional: dict[str, Any] | None) -> CSRSettings | None:
    """The CSR settings if ``additional_config`` selects the CSR backend, else None."""
    additional = additional or {}
    backend = additional.get("kv_cache_backend")
    if backend in (None, "dense", "auto"):
        if "csr" in additional:
            raise CSRConfigError(
                "additional_config has a 'csr' section but kv_cache_backend is not 'csr'"
            )
        return None
    if backend != BACKEND_NAME:
        raise CSRConfigError(
            f"unknown kv_cache_backend {backend!r}; valid: '{BACKEND_NAME}' (or omit it)"
        )
    raw = additional.get("csr") or {}
    if not isinstance(raw, dict):
        raise CSRConfigError("additional_config 'csr' must be a JSON object")
    try:
        return CSRSettings(**raw)
    except ValidationError as e:
        msgs = "; ".join(f"csr.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                         for err in e.errors())
        raise CSRConfigError(f"invalid CSR settings: {msgs}") from None
