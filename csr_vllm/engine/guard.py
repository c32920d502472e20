"""The Guard: what CSR keeps exact next to the compressed pages.

Two bounded pools, both owned by the backend and counted in its side memory:

* :class:`WindowGuard` - the dense recent window. Dense copies of KV blocks, keyed by physical
  block id, for the blocks that hold some sequence's last W tokens. Invariant: every write to
  a (block, offset) whose block has a dense copy updates the copy, and a copy's offsets are
  marked valid only when written; a freshly (re)assigned copy starts all-invalid. So a valid
  entry always equals what vLLM last wrote to that slot, whatever happened to the block in
  between (freed, reused, shared by prefix caching, preempted): nothing stale is ever read.
  Full pool: the least recently *used* block copy (not in any scheduled sequence's window for
  the longest) is dropped; tokens without a valid copy are read through their code, never
  wrong, only less exact (counted as ``window_misses``).
* :class:`OutlierGuard` - per layer and tensor, vectors whose relative reconstruction error
  exceeds a threshold, kept exact. Ring of fixed capacity: when full, the oldest outlier is
  dropped (its token falls back to its code, which stays in the page). Entries are keyed by
  (slot, head); any new write to a slot drops that slot's entries first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class WindowPlan:
    """One step's Guard work, computed once per step and shared by every layer.

    Attributes:
        read_req, read_pos: (request, position) of each window token with a valid copy.
        read_gslot, read_off: where its copy lives.
        write_rows: rows of the step's new tokens whose block has a copy; write_gslot/off.
    """

    read_req: Tensor
    read_pos: Tensor
    read_gslot: Tensor
    read_off: Tensor
    write_rows: Tensor
    write_gslot: Tensor
    write_off: Tensor


class WindowGuard:
    """Dense copies of the blocks in the sequences' recent windows (see module docstring)."""

    def __init__(self, window: int, block_size: int, max_seqs: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype) -> None:
        self.window = window
        self.block_size = block_size
        self.capacity = max_seqs * (math.ceil(window / block_size) + 1) if window else 0
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.block_slot = torch.full((0,), -1, dtype=torch.long)  # grown on demand
        self.slot_block = torch.full((self.capacity,), -1, dtype=torch.long)
        self.last_used = torch.zeros(self.capacity, dtype=torch.long)
        self.valid = torch.zeros(self.capacity, block_size, dtype=torch.bool)
        self.storage: dict[int, Tensor] = {}  # layer -> [cap, H, BS, 2, D]
        self.step = 0
        self.window_misses = 0

    # -- bookkeeping -------------------------------------------------------------------------
    def _ensure_blocks(self, max_block: int) -> None:
        if max_block >= self.block_slot.numel():
            grown = torch.full((max(max_block + 1, 2 * self.block_slot.numel()),), -1,
                               dtype=torch.long)
            grown[: self.block_slot.numel()] = self.block_slot
            self.block_slot = grown

    def _allocate(self, blocks: Tensor) -> None:
        """Give each of ``blocks`` (unique, without a copy) a pool slot, LRU-evicting."""
        for b in blocks.tolist():
            free = (self.slot_block < 0).nonzero()
            if free.numel():
                s = int(free[0])
            else:
                s = int(self.last_used.argmin())
                if self.last_used[s] >= self.step:  # everything is in use this step
                    continue
                self.block_slot[self.slot_block[s]] = -1
            self.slot_block[s] = b
            self.block_slot[b] = s
            self.valid[s] = False
            self.last_used[s] = self.step

    def plan(self, block_table: Tensor, seq_lens: Tensor, query_lens: Tensor,
             slot_mapping: Tensor) -> WindowPlan:
        """Reads and writes of this step. block_table [B, M]; seq_lens/query_lens [B] (CPU);
        slot_mapping [N] for the step's N new tokens, request-major."""
        self.step += 1
        empty = torch.zeros(0, dtype=torch.long)
        if not self.capacity:
            return WindowPlan(empty, empty, empty, empty, empty, empty, empty)
        bs, w = self.block_size, self.window
        seq_lens, query_lens = seq_lens.long(), query_lens.long()
        ctx = seq_lens - query_lens
        self._ensure_blocks(int(block_table.max()) if block_table.numel() else 0)

        # Window reads: positions [ctx - W, ctx) of each request (tokens of earlier steps).
        start = (ctx - w).clamp_min(0)
        counts = ctx - start
        req = torch.repeat_interleave(torch.arange(len(ctx)), counts)
        pos = start[req] + _ragged_arange(counts)
        blocks = block_table[req, pos // bs].long()
        gslot = self.block_slot[blocks]
        self.last_used[gslot[gslot >= 0]] = self.step
        off = pos % bs
        ok = gslot >= 0
        ok[ok.clone()] = self.valid[gslot[ok], off[ok]]
        self.window_misses += int((~ok).sum())

        # Writes: new tokens that will be inside the window after this step need a copy.
        n = int(query_lens.sum())
        slots = slot_mapping[:n].long()
        live = slots >= 0
        wreq = torch.repeat_interleave(torch.arange(len(ctx)), query_lens)
        wpos = ctx[wreq] + _ragged_arange(query_lens)
        wblocks = torch.where(live, slots // bs, torch.zeros_like(slots))
        need = live & (wpos >= seq_lens[wreq] - w)
        want = wblocks[need].unique()
        self._allocate(want[self.block_slot[want] < 0])
        self.last_used[self.block_slot[want][self.block_slot[want] >= 0]] = self.step
        wg = torch.where(live, self.block_slot[wblocks], torch.full_like(slots, -1))
        rows = (wg >= 0).nonzero().squeeze(1)
        woff = slots[rows] % bs
        self.valid[wg[rows], woff] = True
        return WindowPlan(req[ok], pos[ok], gslot[ok], off[ok], rows, wg[rows], woff)

    # -- data --------------------------------------------------------------------------------
    def _store(self, layer: int) -> Tensor:
        if layer not in self.storage:
            self.storage[layer] = torch.zeros(
                self.capacity, self.num_kv_heads, self.block_size, 2, self.head_dim,
                dtype=self.dtype)
        return self.storage[layer]

    def write(self, layer: int, plan: WindowPlan, key: Tensor, value: Tensor) -> None:
        """Copy the step's new K/V [N, H, D] rows the plan selects into the pool."""
        if plan.write_rows.numel():
            kv = torch.stack([key[plan.write_rows], value[plan.write_rows]], dim=2)
            self._store(layer)[plan.write_gslot, :, plan.write_off] = kv.to(self.dtype)

    def read(self, layer: int, plan: WindowPlan) -> tuple[Tensor, Tensor]:
        """Exact K, V [R, H, D] of the plan's window reads."""
        kv = self._store(layer)[plan.read_gslot, :, plan.read_off]  # [R, H, 2, D]
        return kv[:, :, 0], kv[:, :, 1]

    @property
    def nbytes(self) -> int:
        bookkeeping = (self.block_slot.nbytes + self.slot_block.nbytes + self.last_used.nbytes
                       + self.valid.nbytes)
        return sum(t.nbytes for t in self.storage.values()) + bookkeeping

    def reserved_bytes(self, num_layers: int) -> int:
        """Bytes the pool takes once every layer has written (allocated lazily)."""
        per_layer = self.capacity * self.num_kv_heads * self.block_size * 2 * self.head_dim
        return per_layer * num_layers * torch.finfo(self.dtype).bits // 8

    def occupancy(self) -> int:
        """Block copies in use."""
        return int((self.slot_block >= 0).sum())

    def tokens(self) -> int:
        """Exact tokens the window holds (valid slots of the block copies in use)."""
        return int(self.valid[self.slot_block >= 0].sum())


class OutlierGuard:
    """Exact copies of badly coded vectors of one layer's K or V (see module docstring)."""

    def __init__(self, capacity: int, head_dim: int, num_kv_heads: int,
                 dtype: torch.dtype) -> None:
        self.capacity, self.num_kv_heads = capacity, num_kv_heads
        self.owner = torch.full((capacity,), -1, dtype=torch.long)  # slot * H + head
        self.data = torch.zeros(capacity, head_dim, dtype=dtype)
        self.next = 0
        self.added = 0
        self.dropped = 0

    def invalidate(self, slots: Tensor) -> None:
        """Forget entries of slots [N] that are being rewritten."""
        if self.capacity and slots.numel():
            stale = torch.isin(self.owner // self.num_kv_heads, slots) & (self.owner >= 0)
            self.owner[stale] = -1

    def add(self, slots: Tensor, heads: Tensor, vectors: Tensor) -> None:
        """Keep vectors [K, D] of (slot, head) pairs exactly; the oldest entries go first."""
        k = min(slots.numel(), self.capacity)
        if not k:
            return
        slots, heads, vectors = slots[-k:], heads[-k:], vectors[-k:]
        where = (self.next + torch.arange(k)) % self.capacity
        self.dropped += int((self.owner[where] >= 0).sum())
        self.owner[where] = slots * self.num_kv_heads + heads
        self.data[where] = vectors.to(self.data.dtype)
        self.next = (self.next + k) % self.capacity
        self.added += k

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(slots, heads, vectors) of the live entries."""
        live = (self.owner >= 0).nonzero().squeeze(1)
        own = self.owner[live]
        return own // self.num_kv_heads, own % self.num_kv_heads, self.data[live]

    def occupancy(self) -> int:
        return int((self.owner >= 0).sum())

    @property
    def nbytes(self) -> int:
        return self.owner.nbytes + self.data.nbytes

    @staticmethod
    def bytes_for(capacity: int, head_dim: int, dtype: torch.dtype) -> int:
        """What one pool of ``capacity`` vectors takes (owner ids + vectors)."""
        return capacity * (8 + head_dim * torch.finfo(dtype).bits // 8)


def _ragged_arange(counts: Tensor) -> Tensor:
    """[0..c0), [0..c1), ... concatenated."""
    total = int(counts.sum())
    if not total:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total) - torch.repeat_interleave(starts, counts)
