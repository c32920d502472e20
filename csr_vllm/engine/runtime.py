"""Per-engine CSR state and the per-step work every layer shares.

One :class:`CSRRuntime` lives in each worker process, owned by the attention metadata builder
(vLLM builds one per KV cache group). Once per step :meth:`CSRRuntime.plan` turns vLLM's block
table into what the layers need: token positions (for pre-RoPE keys), the referenced blocks and
a block table remapped onto a scratch buffer, and the Guard's reads and writes. Each layer then
calls :meth:`write` (encode + store) and :meth:`dense_view` (reconstruct + overlay exact data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csr_vllm.codec.adaptation import LocalAtoms, atom_limit, filled_atoms
from csr_vllm.codec.codec import SparseCode, TensorCodec
from csr_vllm.codec.dictionary import DictionarySet
from csr_vllm.codec.search import SearchSpec, ordered_for_search
from csr_vllm.engine.dense_layers import DenseLayerStore, exact_decode_attention, full_index
from csr_vllm.engine.guard import OutlierGuard, WindowGuard, WindowPlan, _ragged_arange
from csr_vllm.engine.native_path import NativeKernels, why_not_native
from csr_vllm.engine.page_layout import BlockAtoms, LayerCodec, SlotLayout, with_adaptation
from csr_vllm.engine.settings import CSRSettings
from csr_vllm.engine.sparse_attention import sparse_decode_attention

# Context length from which ``auto`` sends decode rows to the reference's sparse read path
# (the native kernels always take it). Measured with benchmarks/read_paths.py (csr-2b, pre-RoPE keys, batch 4, this CPU): sparse took 1.6-2.7x the
# reconstruct path's time at 512-8192 tokens with fp8 codes, 1.8-2.3x with log5 in the latest
# run (0.97x once, at 2048, within noise), so ``auto`` never picks it here. With pre-RoPE
# keys the score side cannot share a q.D table across tokens (see sparse_attention.py); the
# crossover belongs to the fused kernels. Re-measure when either path changes.
SPARSE_FROM_TOKENS = 1 << 62


@dataclass
class StepPlan:
    """What every layer of one step needs (all CPU tensors).

    Attributes:
        positions: [N] position of each of the step's new tokens (request-major).
        ref_blocks: [R] physical blocks the step's requests reference (sorted, unique).
        ref_pos0: [R] position of each referenced block's first slot.
        scratch_table: [B, M] int32 block table over the scratch buffer (index into ref_blocks).
        new_scratch: [N] scratch slot (scratch block * BS + offset) of each new token, -1 = pad.
        window: the Guard's reads and writes; window_scratch: [Rw] scratch slot of each read.
        num_decodes: leading decode requests the sparse read path serves (0 = none).
        seq_lens, query_lens: [B]; table: [B, M] physical block table.
        window_index: [num_decodes, W] pool slot * BS + offset of the dense window copy of
            each decode request's position t - 1 - W + w (-1: read its code); native path.
        live_rows: rows of the new tokens that have a slot (None: all of them).
        dense_index: [num_decodes, max t] physical slot of every earlier position
            (:func:`~csr_vllm.engine.dense_layers.full_index`), for the dense layers' decode
            rows on the native path; None without dense layers.
    """

    positions: Tensor
    ref_blocks: Tensor
    ref_pos0: Tensor
    scratch_table: Tensor
    new_scratch: Tensor
    window: WindowPlan
    window_scratch: Tensor
    num_decodes: int
    seq_lens: Tensor
    query_lens: Tensor
    table: Tensor
    window_index: Tensor
    live_rows: Tensor | None = None
    dense_index: Tensor | None = None


ENCODE_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # seconds


@dataclass
class RuntimeStats:
    """Counters for /csr/stats and the metrics (worker side)."""

    encoded_vectors: int = 0
    encode_calls: int = 0
    encode_seconds_total: float = 0.0
    # Cumulative histogram of per-call encode time (bounded memory in long-lived servers).
    encode_buckets: tuple[float, ...] = ENCODE_BUCKETS
    encode_bucket_counts: list[int] = field(
        default_factory=lambda: [0] * (len(ENCODE_BUCKETS) + 1))  # last: +Inf
    rel_error_count: int = 0
    _rel_error_sum: float = 0.0
    # Relative errors [K, H] not yet summed: summing them when the statistics are read keeps
    # a tensor reduction and a float() per layer and tensor out of every step.
    _pending_errors: list[Tensor] = field(default_factory=list)
    # Largest transient buffer of the reconstruct read path (decoded K/V + the dense scratch
    # pages of one layer); freed after each layer, but real memory at that moment.
    scratch_bytes_peak: int = 0

    def add_errors(self, err: Tensor) -> None:
        """Count one write's coded vectors and their relative errors [K, H]."""
        self.encoded_vectors += err.numel()
        self.rel_error_count += err.numel()
        self._pending_errors.append(err)
        if len(self._pending_errors) >= 4096:  # bounded memory between reads
            self._flush_errors()

    def _flush_errors(self) -> None:
        if self._pending_errors:
            self._rel_error_sum += sum(float(e.sum()) for e in self._pending_errors)
            self._pending_errors.clear()

    @property
    def rel_error_sum(self) -> float:
        self._flush_errors()
        return self._rel_error_sum

    def observe_encode(self, seconds: float) -> None:
        self.encode_calls += 1
        self.encode_seconds_total += seconds
        i = next((i for i, b in enumerate(self.encode_buckets) if seconds <= b),
                 len(self.encode_buckets))
        self.encode_bucket_counts[i] += 1


class CSRRuntime:
    """Codecs, Guard pools and statistics of one engine's CSR KV cache."""

    def __init__(self, dicts: DictionarySet, settings: CSRSettings, block_size: int,
                 dtype: torch.dtype) -> None:
        shape = dicts.shape
        # Ordered for a screened search after adaptation has reserved its atoms.
        dicts = ordered_for_search(with_adaptation(dicts, settings.adapt_atoms),
                                   SearchSpec.parse(settings.search))
        self.dicts, self.settings = dicts, settings
        self.block_size, self.dtype = block_size, dtype
        self.layout = SlotLayout.of(dicts, block_size)
        # Sized for what this worker serves: a pipeline stage's layers (global indices, as
        # vLLM's layer names carry them), a tensor-parallel rank's KV heads (dicts.kv_heads).
        self.codecs = {layer: LayerCodec(dicts, layer, block_size) for layer in dicts.layers}
        # Sampled atoms (K + V) each block's page holds, per layer: bookkeeping for the
        # statistics only (the pages are the truth), set on every write of the block.
        self.block_atoms: dict[int, Tensor] = {}
        self.window = WindowGuard(settings.guard_window, block_size, settings.guard_max_seqs,
                                  dicts.kv_heads, shape.head_dim, dtype)
        self.outliers: dict[tuple[int, str], OutlierGuard] = {}
        self.stats = RuntimeStats()
        self.dense = DenseLayerStore(resolve_dense_layers(dicts, settings), dicts.kv_heads,
                                     shape.head_dim, dtype)
        # The native CPU kernels where they implement this setting (else the reference).
        self.native_off = why_not_native(dicts, settings)
        self.native = None if self.native_off else NativeKernels(
            self.codecs, self.layout.key_bytes, shape.head_dim, shape.rope_theta,
            dicts.config.key_rope == "pre")

    # -- per step ----------------------------------------------------------------------------
    def plan(self, block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
             slot_mapping: Tensor, sparse_decodes: bool = False) -> StepPlan:
        """The step's plan; with ``sparse_decodes`` the leading decode requests are left out
        of the scratch buffer (the sparse read path serves them)."""
        bs = self.block_size
        seq_lens = seq_lens.long().cpu()
        qsl = query_start_loc.long().cpu()
        query_lens = qsl[1:] - qsl[:-1]
        ctx = seq_lens - query_lens
        reqs = torch.arange(len(seq_lens))
        positions = ctx[torch.repeat_interleave(reqs, query_lens)] + _ragged_arange(query_lens)

        num_decodes = int((query_lens == 1).cumprod(0).sum()) if len(query_lens) else 0
        nblocks = (seq_lens + bs - 1) // bs
        m = int(nblocks.max()) if len(nblocks) else 0
        table = block_table[:, :m].long()
        used = torch.arange(m)[None, :] < nblocks[:, None]
        if sparse_decodes:
            used[:num_decodes] = False
        ref_blocks, inverse = torch.unique(table[used], return_inverse=True)
        scratch_table = torch.zeros_like(table)
        scratch_table[used] = inverse
        # A block's position: its logical index in the first request that references it
        # (prefix caching only shares blocks at the same logical index).
        logical = torch.arange(m).expand_as(table)[used]
        ref_pos0 = torch.full((len(ref_blocks),), -1, dtype=torch.long)
        ref_pos0.scatter_reduce_(0, inverse, logical * bs, reduce="amax", include_self=True)

        n = len(positions)
        slots = slot_mapping[:n].long().cpu()
        new_scratch = self._to_scratch(slots, ref_blocks)
        window = self.window.plan(table, seq_lens, query_lens, slots)
        wreq_blocks = table[window.read_req, window.read_pos // bs] if window.read_req.numel() \
            else torch.zeros(0, dtype=torch.long)
        window_scratch = self._to_scratch(wreq_blocks * bs + window.read_pos % bs, ref_blocks)
        nd = num_decodes if sparse_decodes else 0
        live = slots >= 0
        live_rows = None if bool(live.all()) else live.nonzero().squeeze(1)
        dense_index = full_index(table[:nd], seq_lens[:nd], bs) \
            if self.dense and self.native is not None and nd else None
        return StepPlan(positions, ref_blocks, ref_pos0, scratch_table.to(torch.int32),
                        new_scratch, window, window_scratch, nd, seq_lens, query_lens, table,
                        self._window_index(window, seq_lens, nd), live_rows, dense_index)

    def _window_index(self, window: WindowPlan, seq_lens: Tensor, nd: int) -> Tensor:
        """StepPlan.window_index of the first ``nd`` (decode) requests."""
        w = self.window.window if self.window.capacity else 0
        index = torch.full((nd, w), -1, dtype=torch.long)
        sel = window.read_req < nd
        if nd and w and bool(sel.any()):
            req = window.read_req[sel]
            start = seq_lens[req] - 1 - w
            index[req, window.read_pos[sel] - start] = (window.read_gslot[sel] * self.block_size
                                                        + window.read_off[sel])
        return index

    def _to_scratch(self, slots: Tensor, ref_blocks: Tensor) -> Tensor:
        """Physical slots [K] -> scratch slots [K] (-1 stays -1)."""
        bs = self.block_size
        live = slots >= 0
        blocks = torch.where(live, slots // bs, torch.zeros_like(slots))
        if not len(ref_blocks):
            return torch.full_like(slots, -1)
        idx = torch.searchsorted(ref_blocks, blocks).clamp_max(len(ref_blocks) - 1)
        live &= ref_blocks[idx] == blocks  # blocks outside the scratch buffer map to -1
        return torch.where(live, idx * bs + slots % bs, torch.full_like(slots, -1))

    # -- per layer ---------------------------------------------------------------------------
    def _outlier_pool(self, layer: int, kind: str) -> OutlierGuard:
        key = (layer, kind)
        if key not in self.outliers:
            shape = self.dicts.shape
            self.outliers[key] = OutlierGuard(self.settings.outlier_capacity, shape.head_dim,
                                              self.dicts.kv_heads, self.dtype)
        return self.outliers[key]

    def write(self, layer: int, plan: StepPlan, key: Tensor, value: Tensor, kv_cache: Tensor,
              slot_mapping: Tensor) -> None:
        """Encode the step's new K/V [N, H, D] and store codes (and Guard copies)."""
        n = len(plan.positions)
        key, value = key[:n], value[:n]
        slots = slot_mapping[:n].long()
        if layer in self.dense:  # exact: no code, no Guard copy (:mod:`dense_layers`)
            rows = plan.live_rows
            if rows is None:
                self.dense.write(layer, kv_cache, key, value, slots)
            elif rows.numel():
                self.dense.write(layer, kv_cache, key[rows], value[rows], slots[rows])
            return
        t0 = time.perf_counter()
        if self.native is not None:
            rows = plan.live_rows
            if rows is None:  # the usual step: every new token has a slot, nothing to select
                errs = self.native.write(layer, key, value, plan.positions, kv_cache, slots)
            elif rows.numel():
                errs = self.native.write(layer, key[rows], value[rows], plan.positions[rows],
                                         kv_cache, slots[rows])
            else:
                return
            self._count_encode(t0, errs)
            self.window.write(layer, plan.window, key, value)
            return
        live = plan.live_rows if plan.live_rows is not None else torch.arange(n)
        if not live.numel():
            return
        bs = self.block_size
        s = slots[live]
        codec = self.codecs[layer]
        atoms = self._atoms_for_write(codec, kv_cache, s) if codec.sampled else None
        codes, k_rec, v_rec = codec.encode(key[live], value[live], plan.positions[live], atoms)
        if atoms is not None:
            blocks = torch.unique(s // bs)
            codec.write_atoms(kv_cache, blocks, atoms.key, atoms.value)
            self._count_atoms(layer, blocks, atoms, kv_cache.shape[0])
        kv_cache[s // bs, :, s % bs, : self.layout.code_bytes] = codes
        errs = [(x.float() - rec).norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)
                for x, rec in ((key[live], k_rec), (value[live], v_rec))]  # [K, H] each
        self._count_encode(t0, errs)
        for kind, x, err in (("key", key[live], errs[0]), ("value", value[live], errs[1])):
            x = x.float()
            if self.settings.outlier_threshold > 0 and self.settings.outlier_capacity:
                pool = self._outlier_pool(layer, kind)
                pool.invalidate(s)
                tok, head = (err > self.settings.outlier_threshold).nonzero(as_tuple=True)
                pool.add(s[tok], head, x[tok, head])
        self.window.write(layer, plan.window, key, value)

    def _count_encode(self, t0: float, errs: list[Tensor] | tuple[Tensor, Tensor]) -> None:
        """Statistics of one layer's write: time, vectors, relative errors [K, H] of K, V."""
        self.stats.observe_encode(time.perf_counter() - t0)
        for err in errs:
            self.stats.add_errors(err)

    def _atoms_for_write(self, codec: LayerCodec, kv_cache: Tensor, slots: Tensor) -> BlockAtoms:
        """The sampled atoms of the blocks the step writes [K slots], for encoding: emptied
        for blocks whose offset 0 is written (vLLM reuses a block from its first slot), with
        each block's limit from the last offset written."""
        bs = self.block_size
        blocks, block_of = torch.unique(slots // bs, return_inverse=True)
        k_atoms, v_atoms = codec.read_atoms(kv_cache, blocks)
        offsets = slots % bs
        restart = torch.zeros(len(blocks), dtype=torch.bool)
        restart[block_of[offsets == 0]] = True
        k_atoms[restart] = 0.0
        v_atoms[restart] = 0.0
        last = torch.full((len(blocks),), -1, dtype=torch.long)
        last.scatter_reduce_(0, block_of, offsets, reduce="amax")
        return BlockAtoms(k_atoms, v_atoms, block_of, atom_limit(last, bs, codec.sampled))

    def _count_atoms(self, layer: int, blocks: Tensor, atoms: BlockAtoms,
                     num_blocks: int) -> None:
        counts = self.block_atoms.setdefault(layer, torch.zeros(num_blocks, dtype=torch.long))
        per_block = [filled_atoms(a.flatten(1, 2)).sum(-1) for a in (atoms.key, atoms.value)]
        counts[blocks] = per_block[0] + per_block[1]

    def sampled_atoms(self) -> dict[int, int]:
        """Sampled atoms (K + V) held in the pages, per layer (blocks vLLM holds or keeps
        cached; a freed block's atoms go when its first slot is written again)."""
        return {layer: int(c.sum()) for layer, c in sorted(self.block_atoms.items())}

    def _read_atoms(self, layer: int, kv_cache: Tensor, blocks: Tensor,
                    block_of: Tensor) -> BlockAtoms | None:
        codec = self.codecs[layer]
        if not codec.sampled:
            return None
        k_atoms, v_atoms = codec.read_atoms(kv_cache, blocks)
        return BlockAtoms(k_atoms, v_atoms, block_of)

    def dense_view(self, layer: int, plan: StepPlan, key: Tensor, value: Tensor,
                   kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """K, V [R * BS, H, D] of every referenced slot, in scratch order: reconstructed from
        the codes, then overlaid with outliers, the dense window and the step's own tokens."""
        if layer in self.dense:  # the store holds the step's own tokens too (written first)
            return self.dense.read_blocks(layer, kv_cache, plan.ref_blocks)
        if self.native is not None:
            # Every referenced slot, as the reference: decoding only the slots before the
            # step's tokens changed greedy tokens under preemption + prefix caching with the
            # dense window (tests/test_vllm_e2e.py), cause not yet found.
            k, v = self.native.decode_dense(layer, kv_cache, plan.ref_blocks,
                                            torch.full_like(plan.ref_pos0, self.block_size),
                                            plan.ref_pos0, self.dtype)
        else:
            k, v = self._decode_referenced(layer, plan, kv_cache)

        for kind, dst in (("key", k), ("value", v)):
            pool = self.outliers.get((layer, kind))
            if pool is not None and pool.occupancy():
                o_slots, o_heads, o_vec = pool.entries()
                sc = self._to_scratch(o_slots, plan.ref_blocks)
                hit = sc >= 0
                dst[sc[hit], o_heads[hit]] = o_vec[hit].to(self.dtype)
        if plan.window_scratch.numel():
            wk, wv = self.window.read(layer, plan.window)
            hit = plan.window_scratch >= 0
            k[plan.window_scratch[hit]], v[plan.window_scratch[hit]] = wk[hit], wv[hit]
        n = len(plan.new_scratch)
        live = plan.new_scratch >= 0
        k[plan.new_scratch[live]] = key[:n][live].to(self.dtype)
        v[plan.new_scratch[live]] = value[:n][live].to(self.dtype)
        return k, v

    def _decode_referenced(self, layer: int, plan: StepPlan,
                           kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """The reference decode of every referenced slot: K, V [R * BS, H, D]."""
        bs, r = self.block_size, len(plan.ref_blocks)
        pages = kv_cache[plan.ref_blocks]  # [R, H, BS, C]
        slots = pages.permute(0, 2, 1, 3).reshape(r * bs, pages.shape[1], pages.shape[3])
        pos = (plan.ref_pos0[:, None] + torch.arange(bs)).reshape(-1)
        atoms = self._read_atoms(layer, kv_cache, plan.ref_blocks,
                                 torch.arange(r).repeat_interleave(bs))
        k, v = self.codecs[layer].decode(slots, pos, atoms)
        # Slots past a sequence's end hold whatever the page held; the kernel never reads
        # them, but keep them finite.
        k, v = torch.nan_to_num_(k, 0.0, 0.0, 0.0), torch.nan_to_num_(v, 0.0, 0.0, 0.0)
        return k.to(self.dtype), v.to(self.dtype)

    def sparse_decode(self, layer: int, plan: StepPlan, query: Tensor, key: Tensor,
                      value: Tensor, kv_cache: Tensor, scale: float, output: Tensor) -> None:
        """Attention in the sparse domain for the plan's leading decode requests.

        query [N, Hq, D]; writes output rows [0, num_decodes) ([N, Hq * D] or [N, Hq, D])."""
        nd = plan.num_decodes
        if layer in self.dense:
            self._dense_decode(layer, plan, query, key, value, kv_cache, scale, output)
            return
        if self.native is not None:
            store = self.window._store(layer) if self.window.capacity else None
            self.native.decode_attention(layer, query[:nd], kv_cache, plan.table[:nd],
                                         plan.seq_lens[:nd], store, plan.window_index,
                                         key[:nd], value[:nd], scale, output[:nd])
            return
        bs, codec = self.block_size, self.codecs[layer]
        kc, vc = codec.keys[0], codec.values[0]
        kb, cb = self.layout.key_bytes, self.layout.code_bytes
        h, d = self.dicts.kv_heads, self.dicts.shape.head_dim
        win = plan.window
        wk, wv = self.window.read(layer, win) if win.read_req.numel() else (None, None)
        pools = [self.outliers.get((layer, kind)) for kind in ("key", "value")]
        entries = [p.entries() if p is not None and p.occupancy() else None for p in pools]
        for i in range(plan.num_decodes):
            t = int(plan.seq_lens[i])
            pos = torch.arange(t)
            phys = plan.table[i, pos // bs] * bs + pos % bs
            slots = kv_cache[phys // bs, :, phys % bs]  # [T, H, C]
            kcode = kc.unpack(slots[..., :kb].reshape(t * h, -1).contiguous())
            vcode = vc.unpack(slots[..., kb:cb].reshape(t * h, -1).contiguous())
            k_extra = v_extra = None
            if codec.sampled:  # sampled atoms: their part of each vector, rebuilt densely
                nb = -(-t // bs)
                atoms = self._read_atoms(layer, kv_cache, plan.table[i, :nb], pos // bs)
                kcode, k_extra = _split_sampled(kc, kcode, atoms.key[:, 0],
                                                (pos // bs).repeat_interleave(h))
                vcode, v_extra = _split_sampled(vc, vcode, atoms.value[:, 0],
                                                (pos // bs).repeat_interleave(h))
                k_extra, v_extra = k_extra.reshape(t, h, d), v_extra.reshape(t, h, d)
            mk = torch.zeros(t, h, dtype=torch.bool)
            mv = torch.zeros(t, h, dtype=torch.bool)
            ek = torch.zeros(t, h, d, dtype=self.dtype)
            ev = torch.zeros(t, h, d, dtype=self.dtype)
            if wk is not None:
                sel = win.read_req == i
                p = win.read_pos[sel]
                ek[p], ev[p], mk[p], mv[p] = wk[sel], wv[sel], True, True
            order = phys.argsort()
            for entry, dst, mask in zip(entries, (ek, ev), (mk, mv), strict=True):
                if entry is not None:
                    o_slots, o_heads, o_vec = entry
                    at = torch.searchsorted(phys[order], o_slots).clamp_max(t - 1)
                    hit = phys[order][at] == o_slots
                    tok = order[at[hit]]
                    dst[tok, o_heads[hit]] = o_vec[hit].to(self.dtype)
                    mask[tok, o_heads[hit]] = True
            row = int(plan.query_lens[:i].sum())
            ek[t - 1], ev[t - 1], mk[t - 1], mv[t - 1] = key[row], value[row], True, True
            shape = (t, h, kcode.indices.shape[1], kcode.indices.shape[2])
            vshape = (t, h, vcode.indices.shape[1], vcode.indices.shape[2])
            out = sparse_decode_attention(
                query[row], kcode.indices.reshape(shape), kcode.coefs.reshape(shape), kc.atoms,
                vcode.indices.reshape(vshape), vcode.coefs.reshape(vshape), vc.atoms,
                pos, mk, ek, mv, ev, scale, codec.pre_rope, codec.rope_theta,
                k_extra=k_extra, v_extra=v_extra)
            output[row] = out.reshape(output[row].shape).to(output.dtype)

    def _dense_decode(self, layer: int, plan: StepPlan, query: Tensor, key: Tensor,
                      value: Tensor, kv_cache: Tensor, scale: float, output: Tensor) -> None:
        """Decode rows of a dense layer: exact attention over its store."""
        nd = plan.num_decodes
        if self.native is not None:  # every earlier position an exact row of the store
            self.native.decode_attention(layer, query[:nd], kv_cache, plan.table[:nd],
                                         plan.seq_lens[:nd], self.dense.store(layer, kv_cache),
                                         plan.dense_index, key[:nd], value[:nd], scale,
                                         output[:nd])
            return
        bs = self.block_size
        for i in range(nd):
            t = int(plan.seq_lens[i])
            pos = torch.arange(t)
            k, v = self.dense.read_tokens(layer, kv_cache, plan.table[i, pos // bs] * bs + pos % bs)
            row = int(plan.query_lens[:i].sum())
            k[t - 1], v[t - 1] = key[row], value[row]
            out = exact_decode_attention(query[row], k, v, scale)
            output[row] = out.reshape(output[row].shape).to(output.dtype)

    def auto_sparse(self, max_seq_len: int) -> bool:
        """``read_path: auto``: the sparse path for decode rows from this context length on:
        always with the native kernels (attention straight from the pages), never on the
        reference (measured by benchmarks/read_paths.py; see docs/results.md)."""
        return self.native is not None or max_seq_len >= SPARSE_FROM_TOKENS

    # -- accounting --------------------------------------------------------------------------
    def sampled_atom_bytes(self) -> int:
        """Bytes of the sampled atoms the pages hold (fp16, each D channels)."""
        return sum(self.sampled_atoms().values()) * self.dicts.shape.head_dim * 2

    def side_bytes(self) -> dict[str, int]:
        """Memory held outside vLLM's KV pool, by kind."""
        return {
            "dictionaries": self.dicts.nbytes,
            "window_guard": self.window.reserved_bytes(len(self.dicts.layers)),
            "outlier_guard": sum(p.nbytes for p in self.outliers.values()),
            "native_tables": self.native.extra_bytes if self.native is not None else 0,
            "dense_layers": self.dense.nbytes,
        }


def resolve_dense_layers(dicts: DictionarySet, settings: CSRSettings) -> tuple[int, ...]:
    """The dense layers of this worker: the settings' list, else the dictionary's
    recommendation; only the layers this worker serves (a pipeline stage's)."""
    asked = settings.dense_layers
    if asked is None:
        asked = tuple(int(i) for i in dicts.info.get("dense_layers", ()))
    n = dicts.shape.num_layers
    bad = [i for i in asked if not 0 <= i < n]
    if bad:
        raise ValueError(f"dense_layers {bad} are not layers of this model (0-{n - 1})")
    return tuple(i for i in asked if i in dicts.layers)


def _split_sampled(codec: TensorCodec, code: SparseCode, atoms: Tensor,
                   group: Tensor) -> tuple[SparseCode, Tensor]:
    """Split codes [N] into their trained-atom part (sampled entries zeroed, for the sparse
    read path's per-atom tables) and the dense sum of their sampled-atom entries [N, D]."""
    own = code.indices >= codec.config.shared_atoms
    zero = torch.zeros_like(code.coefs)
    extra = codec.decode(SparseCode(code.indices, torch.where(own, code.coefs, zero),
                                    code.scale), LocalAtoms(atoms, group))
    shared = SparseCode(torch.where(own, torch.zeros_like(code.indices), code.indices),
                        torch.where(own, zero, code.coefs), code.scale)
    return shared, extra
