"""The KV pool ``csr-vllm serve`` asks vLLM's CPU backend for when the user names none.

Why: vLLM's CPU worker (``vllm/v1/worker/cpu_worker.py``), given no explicit size, wants
``--gpu-memory-utilization`` (0.92) of node 0's *total* memory and refuses to start when that
is more than the node's *available* memory (MemFree + file cache + SReclaimable, clamped to the
cgroup limit: ``vllm.utils.cpu_resource_utils.get_memory_node_info``), i.e. on any machine where
other programs use more than 8 % of it. An explicit size (``--kv-cache-memory-bytes``, or
``VLLM_CPU_KVCACHE_SPACE`` in GiB, which ``vllm/platforms/cpu.py`` turns into it) skips that
check; the worker then only requires the size to fit the node's available memory when it
allocates the pool, after the model is loaded.

So the CLI passes an explicit size, chosen as an operator would (all sizes in bytes)::

    reserve = this CLI process (RSS now) + vLLM's API server + EngineCore (measured RSS,
              plus the model's weights) + CSR's side memory (dictionary atoms, Guard pools)
    room    = available - reserve
    ceiling = max_num_seqs x max_model_len x bytes_per_token   (more is never used at once)
    budget  = min(KEEP_FRACTION x room, ceiling)

and stops with one line (what is free, what to pass) when the budget cannot hold a single
``max_model_len`` sequence, which vLLM requires. The user's own ``--kv-cache-memory-bytes``,
``VLLM_CPU_KVCACHE_SPACE`` or ``--gpu-memory-utilization`` wins: then nothing is passed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
MiB = 2**20

# RSS of the processes ``vllm serve`` starts, measured with SmolLM2-135M-Instruct after a chat
# completion (2 CPU cores, vllm-cpu 0.32; tests/test_make_serve.py prints them), without their
# KV pool, the model's weights and CSR's side memory, which are counted separately; rounded
# up. RSS counts shared library pages in every process: an overestimate, on the safe side.
API_SERVER_RSS = 850 * MiB  # the `vllm serve` process (HTTP, tokenizer): 771 MiB measured
# EngineCore (679 MiB) + its CPU worker process (1,052 MiB: 4,399 less the 2,880 MiB pool, the
# 257 MiB of weights, 120 MiB of atoms and 90 MiB of Guard) + multiprocessing's tracker (13)
ENGINE_CORE_BASE_RSS = 1850 * MiB
# Share of the room left after the reserve that the pool may take: the rest stays free for
# transient buffers (the reconstruct path's scratch, tokenizer, HTTP) and other programs.
KEEP_FRACTION = 0.75
# vLLM's CPU default for the OpenAI server (engine/arg_utils.py, per CPU worker).
CPU_DEFAULT_MAX_NUM_SEQS = 128

# What takes the choice out of csr-vllm's hands (vLLM's flag names and their aliases).
OVERRIDE_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization",
                  "--device-memory-utilization")
OVERRIDE_ENV = "VLLM_CPU_KVCACHE_SPACE"


class NotEnoughMemory(ValueError):
    """Too little memory is free for vLLM's processes and the smallest usable KV pool."""


@dataclass(frozen=True)
class PoolNeeds:
    """What the server needs besides the pool, and what sizes the pool (bytes, tokens).

    Attributes:
        process_bytes: RSS of this CLI process, vLLM's API server and EngineCore (with the
            model's weights), without the KV pool.
        side_bytes: CSR's memory outside the pool (dictionary atoms, Guard pools).
        bytes_per_token: pool bytes one token takes (all layers and KV heads).
        side_bytes_per_token: CSR's memory outside the pool that grows with it: the dense
            layers' store (:mod:`csr_vllm.engine.dense_layers`), per pool token.
        max_model_len: longest sequence; the pool must hold one.
        max_num_seqs: sequences the scheduler runs at once.
    """

    process_bytes: int
    side_bytes: int
    bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    side_bytes_per_token: int = 0

    @property
    def pool_fraction(self) -> float:
        """Share of the memory given to KV that vLLM's pool gets (the rest: the store that
        grows with it)."""
        return self.bytes_per_token / (self.bytes_per_token + self.side_bytes_per_token)

    @property
    def reserve_bytes(self) -> int:
        return self.process_bytes + self.side_bytes

    @property
    def ceiling_bytes(self) -> int:
        return self.max_num_seqs * self.max_model_len * self.bytes_per_token

    @property
    def minimum_bytes(self) -> int:
        return self.max_model_len * self.bytes_per_token


@dataclass(frozen=True)
class KVBudget:
    """The decision: ``kv_bytes`` to pass as ``--kv-cache-memory-bytes`` (None: pass nothing,
    the user chose) and the start-up line that says why."""

    kv_bytes: int | None
    line: str

    def flags(self) -> list[str]:
        return [] if self.kv_bytes is None else ["--kv-cache-memory-bytes", str(self.kv_bytes)]


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def choose_kv_budget(available: int, needs: PoolNeeds, override: str | None = None,
                     where: str = "node 0") -> KVBudget:
    """The pool to ask for with ``available`` bytes free (as vLLM's CPU worker measures them).

    ``override``: how the user sized the pool themselves (see :func:`user_override`), if so.
    Raises :class:`NotEnoughMemory` when the budget cannot hold one ``max_model_len`` sequence.
    """
    if override is not None:
        return KVBudget(None, f"KV budget:  {override} given: vLLM sizes the pool as asked")
    room = available - needs.reserve_bytes
    share = int(KEEP_FRACTION * room * needs.pool_fraction)
    if share < needs.minimum_bytes:
        raise NotEnoughMemory(
            f"only {gib(available)} of memory is free on {where}; serving needs about "
            f"{gib(needs.reserve_bytes + needs.minimum_bytes / KEEP_FRACTION)} "
            f"({gib(needs.process_bytes)} for vLLM's processes, {gib(needs.side_bytes)} for "
            f"CSR's side memory, {needs.minimum_bytes / MiB:.0f} MiB of KV for one "
            f"{needs.max_model_len:,}-token sequence). Free memory, or size the pool yourself: "
            f"csr-vllm serve -- --kv-cache-memory-bytes "
            f"{max(needs.minimum_bytes, 64 * MiB)} --max-model-len {needs.max_model_len}")
    why = (f"{gib(available)} free on {where} - {gib(needs.reserve_bytes)} reserved "
           f"({gib(needs.process_bytes)} vLLM processes + {gib(needs.side_bytes)} CSR side "
           f"memory) = {gib(room)}; {KEEP_FRACTION:.0%} of it")
    if needs.side_bytes_per_token:
        why += (f", {needs.pool_fraction:.0%} of that for the pool (the dense layers' store "
                f"takes {needs.side_bytes_per_token:,} B per pool token beside it)")
    if needs.ceiling_bytes <= share:
        budget = needs.ceiling_bytes
        why += (f" is more than the most the scheduler can hold: {needs.max_num_seqs} x "
                f"{needs.max_model_len:,} tokens x {needs.bytes_per_token:,} B/token")
    else:
        budget = share
    return KVBudget(budget, f"KV budget:  {gib(budget)} (--kv-cache-memory-bytes {budget}): "
                    f"{why}")


def flag_value(args: Sequence[str], *names: str) -> str | None:
    """Value of the last ``--name V`` / ``--name=V`` in ``args`` (``_`` spelled as ``-`` too,
    as vLLM's parser accepts), or None."""
    value = None
    for i, arg in enumerate(args):
        flag, eq, rest = arg.partition("=")
        if flag.replace("_", "-") in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else "")
    return value


def user_override(vllm_args: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """How the user sized the pool themselves (a flag or the environment), or None."""
    for name in OVERRIDE_FLAGS:
        if flag_value(vllm_args, name) is not None:
            return name
    if environ.get(OVERRIDE_ENV, "") != "":  # vLLM ignores an empty one too
        return f"{OVERRIDE_ENV}={environ[OVERRIDE_ENV]}"
    return None


def int_flag(vllm_args: Sequence[str], name: str, default: int) -> int:
    """An integer ``vllm serve`` flag from ``vllm_args``, else ``default`` (also for forms this
    does not parse, such as ``8k``: the ceiling is then only looser or tighter, never unsafe,
    since vLLM checks the pool against the node's memory itself)."""
    value = flag_value(vllm_args, name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


# -- measurements (not pure: they read this machine) -----------------------------------------
def is_cpu_build() -> bool:
    """Whether the installed vLLM runs on the CPU platform (vLLM's own test, without importing
    it: ``VLLM_TARGET_DEVICE=cpu`` or a version naming ``cpu``)."""
    import importlib.metadata as md

    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        return "cpu" in md.version("vllm")
    except md.PackageNotFoundError:
        try:
            md.version("vllm-cpu")
            return True
        except md.PackageNotFoundError:
            return False


def node_available_memory() -> tuple[int, int]:
    """(NUMA node, available bytes) exactly as vLLM's CPU worker measures them at start-up."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    return node, get_memory_node_info(node).available_memory


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's weight files (what EngineCore loads into memory)."""
    files = [*Path(model_dir).glob("*.safetensors"), *Path(model_dir).glob("*.bin")]
    return sum(f.stat().st_size for f in files)


def process_bytes(model_dir: Path) -> int:
    """RSS this CLI process keeps while serving, plus vLLM's API server and EngineCore."""
    import psutil

    own = psutil.Process().memory_info().rss
    return own + API_SERVER_RSS + ENGINE_CORE_BASE_RSS + weight_bytes(model_dir)


def csr_side_bytes(dicts, block_size: int = 128, dtype_bytes: int = 2) -> int:
    """CSR's memory outside the pool at its fullest with the engine's default settings: the
    dictionary atoms, the Guard's dense window and its outlier pools (K and V, every layer).
    ``block_size``: vLLM's CPU block; ``dtype_bytes``: the model's (bf16)."""
    import torch

    from csr_vllm.engine.guard import OutlierGuard, WindowGuard
    from csr_vllm.engine.settings import CSRSettings

    st, shape = CSRSettings(), dicts.shape
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    window = WindowGuard(st.guard_window, block_size, st.guard_max_seqs, shape.num_kv_heads,
                         shape.head_dim, dtype).reserved_bytes(shape.num_layers)
    outliers = 2 * shape.num_layers * OutlierGuard.bytes_for(st.outlier_capacity,
                                                             shape.head_dim, dtype)
    return dicts.nbytes + window + outliers
