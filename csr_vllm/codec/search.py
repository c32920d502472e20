"""A screened atom search: the pursuit looks only at the atoms of the clusters nearest the
residual instead of the whole dictionary.

Coding a vector is S passes over all A atoms (csr-2b at head_dim 64: 7 x 8192 x 64
multiply-adds per vector, six times the model's own arithmetic per token, docs/results.md
"What bounds the CPU path"). Grouping the atoms into K clusters by direction (k-means on the
sphere, d and -d counted as one direction, since the pursuit picks by |<r, d>|) and probing
only the P clusters whose centroids correlate best with the current residual looks at
K + P * A / K atoms a pick instead of A (K = 256, P = 32: 16%). The picks are then the best
atoms of those clusters, not of the dictionary (measured: perplexity within 0.4 points of the
full search, docs/results.md *Screened search*; RULER through the engine 54 of 60 trials
against the full search's 55). A setting (``search``), off by default: not yet measured at
head_dim 128.

The clusters are derived from the atoms alone (seeded, deterministic), at engine start:
a dictionary folder is unchanged. Clustering every dictionary of a model takes seconds (SmolLM2's
60 on one core), so the result is kept in the cache under a digest of the
atoms it was derived from (``clusters/`` in :func:`csr_vllm.paths.cache_root`) and read back
on the next start. The atoms are reordered so that each cluster is one
contiguous index range (:func:`ordered_for_search`), the layout a SIMD kernel can scan; codes
then address the reordered atoms, which only the engine that wrote them reads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

KMEANS_ITERS = 12
SEED = 0
# Part of the cache key: bump when the clustering's result for the same atoms changes.
CLUSTERS_VERSION = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpec:
    """K clusters, P probed per pick; K = 0: every atom (the full search)."""

    clusters: int = 0
    probes: int = 0

    def __post_init__(self) -> None:
        if self.clusters < 0 or self.probes < 0 or (self.clusters > 0) != (self.probes > 0):
            raise ValueError(f"a screened search needs clusters > 0 and probes > 0, got "
                             f"{self.clusters}/{self.probes}")
        if self.probes > self.clusters:
            raise ValueError(f"cannot probe {self.probes} of {self.clusters} clusters")

    @property
    def full(self) -> bool:
        return self.clusters == 0

    @classmethod
    def parse(cls, text: str) -> SearchSpec:
        """``full`` or ``K/P`` (e.g. ``256/32``)."""
        if text == "full":
            return cls()
        m = re.fullmatch(r"(\d+)/(\d+)", text)
        if not m:
            raise ValueError(f"search must be 'full' or 'K/P' (clusters/probes, e.g. 256/32), "
                             f"got {text!r}")
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return "full" if self.full else f"{self.clusters}/{self.probes}"


@dataclass(frozen=True)
class AtomClusters:
    """Clusters of one chunk dictionary whose atoms are ordered by cluster.

    Attributes:
        centroids: [K, Dc] unit-norm cluster directions.
        offsets: [K + 1] int64; cluster k holds atoms ``[offsets[k], offsets[k + 1])``.
        probes: P, clusters searched per pick.
    """

    centroids: Tensor
    offsets: Tensor
    probes: int

    @functools.cached_property
    def cluster_of(self) -> Tensor:
        """[A'] the cluster of each atom (derived once, not per pick)."""
        sizes = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(sizes), device=self.offsets.device),
                                       sizes)

    def allowed(self, residual: Tensor) -> Tensor:
        """[N, A'] bool: the atoms of the P clusters whose centroids correlate best with each
        residual [N, Dc] (A' = the clustered atoms, ``offsets[-1]``)."""
        k = self.centroids.shape[0]
        scores = (residual @ self.centroids.to(residual.dtype).T).abs()
        top = scores.topk(self.probes, dim=1).indices
        probed = torch.zeros(residual.shape[0], k, dtype=torch.bool, device=residual.device)
        probed.scatter_(1, top, True)
        return probed[:, self.cluster_of.to(residual.device)]


def cluster_atoms(atoms: Tensor, k: int, iters: int = KMEANS_ITERS,
                  seed: int = SEED) -> tuple[Tensor, Tensor, Tensor]:
    """Sign-invariant spherical k-means of unit atoms [A, Dc].

    Returns (order [A]: atom indices sorted by cluster, stable; centroids [K, Dc];
    offsets [K + 1]). Deterministic for given atoms (seeded initialisation; an emptied
    cluster keeps its previous centroid)."""
    a = atoms.shape[0]
    if not 1 <= k <= a:
        raise ValueError(f"cannot make {k} clusters of {a} atoms")
    x = atoms.float()
    gen = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(a, generator=gen)[:k]].clone()
    for _ in range(iters):
        sim = x @ cent.T
        assign = sim.abs().argmax(1)
        sign = sim.gather(1, assign[:, None]).sign()
        sums = torch.zeros_like(cent).index_add_(0, assign, x * sign)
        norms = sums.norm(dim=1, keepdim=True)
        cent = torch.where(norms > 0, sums / norms.clamp_min(1e-12), cent)
    assign = (x @ cent.T).abs().argmax(1)
    order = torch.argsort(assign, stable=True)
    offsets = torch.zeros(k + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(assign, minlength=k).cumsum(0)
    return order, cent, offsets


def ordered_for_search(dicts, spec: SearchSpec):
    """``dicts`` (a :class:`~csr_vllm.codec.dictionary.DictionarySet`) with the screened
    search ``spec``: the codec setting says it, every chunk dictionary's trained atoms are
    reordered by cluster, and the clusters ride along (``key_clusters``/``value_clusters``).
    Sampled-atom slots (adaptation) stay at the end, outside the clusters. ``spec.full``, or a
    set already ordered for ``spec``: ``dicts`` unchanged."""
    cfg = dicts.config
    if spec.full or (dicts.key_clusters is not None and cfg.key.search == str(spec)):
        return dicts  # nothing to do, or ordered for this search already
    fields = {}
    for kind in ("key", "value"):
        tcfg = getattr(cfg, kind)
        atoms = getattr(dicts, f"{kind}_atoms")  # [G, Hg, C, A, Dc]
        shared = tcfg.shared_atoms
        if spec.clusters > shared:
            raise ValueError(f"search {spec}: more clusters than the {shared} {kind} atoms")
        order, cents, offs = clusters_of(atoms[..., :shared, :], spec.clusters)
        out = atoms.clone()
        out[..., :shared, :] = atoms[..., :shared, :].gather(
            3, order[..., None].expand(-1, -1, -1, -1, atoms.shape[-1]))
        fields[f"{kind}_atoms"] = out
        fields[f"{kind}_clusters"] = (cents, offs)
    config = dataclasses.replace(
        cfg, key=dataclasses.replace(cfg.key, search=str(spec)),
        value=dataclasses.replace(cfg.value, search=str(spec)))
    return dataclasses.replace(dicts, config=config, **fields)


def clusters_of(atoms: Tensor, k: int, cache: Path | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cluster_atoms` of every chunk dictionary of ``atoms`` [G, Hg, C, A, Dc].

    Returns (order [G, Hg, C, A] int64, centroids [G, Hg, C, K, Dc] float32, offsets
    [G, Hg, C, K + 1] int64). Read from ``cache`` (default: ``clusters/`` in the cache root)
    when these exact atoms were clustered before; computed and stored otherwise. A cache that
    cannot be written, or a file that does not hold a valid clustering, costs the computation,
    never a wrong order."""
    from safetensors.torch import load_file, save_file

    from csr_vllm.paths import cache_root

    g, hg, c, a, dc = atoms.shape
    digest = hashlib.sha256(atoms.contiguous().view(torch.uint8).reshape(-1).numpy())
    digest.update(f"{atoms.dtype}|{tuple(atoms.shape)}|{k}|{KMEANS_ITERS}|{SEED}|"
                  f"{CLUSTERS_VERSION}".encode())
    path = (cache or cache_root() / "clusters") / f"{digest.hexdigest()[:32]}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            order, cents, offs = t["order"], t["centroids"], t["offsets"]
            if (order.shape == (g, hg, c, a) and cents.shape == (g, hg, c, k, dc)
                    and offs.shape == (g, hg, c, k + 1)
                    and torch.equal(order.sort(-1).values,
                                    torch.arange(a).expand(g, hg, c, a))
                    and bool((offs[..., -1] == a).all())):
                return order, cents, offs
        except Exception as e:  # noqa: BLE001  (any unreadable file: recompute it)
            logger.warning("CSR: cluster cache %s unreadable (%s); recomputing", path, e)
    order = torch.empty(g, hg, c, a, dtype=torch.long)
    cents = torch.empty(g, hg, c, k, dc, dtype=torch.float32)
    offs = torch.empty(g, hg, c, k + 1, dtype=torch.long)
    for i in range(g):
        for h in range(hg):
            for j in range(c):
                order[i, h, j], cents[i, h, j], offs[i, h, j] = cluster_atoms(atoms[i, h, j], k)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the entry from other users of the cache
        save_file({"order": order, "centroids": cents, "offsets": offs}, tmp)
        os.replace(tmp, path)  # whole file or none: concurrent engines may race here
    except OSError as e:
        logger.info("CSR: clusters not cached (%s): computed again at the next start", e)
    return order, cents, offs
