"""``csr:`` Prometheus metrics, registered next to vLLM's ``vllm:`` ones on ``/metrics``.

The API process polls the workers (``collective_rpc("csr_stats")``) and mirrors the report into
``prometheus_client`` objects, so vLLM's own ``/metrics`` route serves them. Correct with
several API-server processes (``--api-server-count N``, where vLLM switches prometheus_client
to multiprocess mode): every process polls the same engine, so

* gauges use ``multiprocess_mode="mostrecent"`` (one value, not one per process), and
* cumulative series (the encode-time histogram, the encoded-vectors counter), which
  multiprocess mode *sums* over processes, are written by API server 0 only.

Counters and the histogram mirror the workers' cumulative totals exactly: each refresh adds the
difference since its last poll to each bucket and to the sum (prometheus_client has no public
"add n observations to bucket i"; ``_buckets``/``_sum`` are the values ``observe`` itself
increments). A restarted engine (totals going down) restarts the mirror from the new totals.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# (name, help) of every gauge; units are in the help text, as Prometheus asks.
GAUGES: dict[str, str] = {
    "csr:kv_bytes_per_token": "Bytes of vLLM's KV pool one token takes with CSR (all layers, "
                              "all KV heads, K and V), in bytes.",
    "csr:dense_equivalent_bytes_per_token": "Bytes one token would take in the model's dense "
                                            "KV dtype (bf16), in bytes.",
    "csr:compression_ratio": "Dense-equivalent bytes per token over CSR bytes per token (ratio).",
    "csr:kv_capacity_tokens": "Tokens vLLM's KV pool holds with CSR (blocks x block size), "
                              "in tokens.",
    "csr:dense_equivalent_capacity_tokens": "Tokens the same pool bytes would hold in the dense "
                                            "dtype, in tokens.",
    "csr:guard_tokens": "Tokens held exactly (dense) in the Guard's recent window, in tokens.",
    "csr:guard_bytes": "Memory of the Guard pools (dense window + outlier copies), in bytes.",
    "csr:outlier_vectors": "K/V vectors held exactly by the outlier Guard, in vectors.",
    "csr:sampled_atoms": "Live dictionary atoms sampled from prompts' own K/V, in atoms.",
    "csr:sampled_atom_bytes": "Memory of the live sampled atoms, in bytes.",
    "csr:side_bytes": "Memory CSR holds outside vLLM's KV pool, by kind, in bytes.",
    "csr:reconstruction_rel_error": "Mean relative L2 reconstruction error of sampled encoded "
                                    "K/V vectors (ratio).",
    "csr:info": "Constant 1, labelled with the CSR preset and the dictionary's SHA-256.",
}
ENCODE_HELP = "Time of one CSR encode call (one layer's new K/V of a step), in seconds."
ENCODED_HELP = "K/V head vectors encoded into CSR pages, in vectors."


class CSRMetrics:
    """The ``csr:`` metrics of one API-server process."""

    def __init__(self, model_name: str, buckets: tuple[float, ...], writer: bool,
                 registry: CollectorRegistry = REGISTRY) -> None:
        """``writer``: this process owns the cumulative series (API server 0). Create one per
        process and registry (prometheus_client refuses a second registration)."""
        self.labels = {"model_name": model_name}
        names = ["model_name"]
        self.gauges: dict[str, Any] = {}
        for name, doc in GAUGES.items():
            extra = {"csr:side_bytes": ["kind"],
                     "csr:info": ["preset", "dictionary_sha256"]}.get(name, [])
            self.gauges[name] = Gauge(name, doc, names + extra, multiprocess_mode="mostrecent",
                                      registry=registry)
        self.writer = writer
        self.encode = Histogram("csr:encode_seconds", ENCODE_HELP, names, buckets=buckets,
                                registry=registry) if writer else None
        self.encoded = Counter("csr:encoded_vectors", ENCODED_HELP, names,
                               registry=registry) if writer else None
        self._seen_counts: list[int] | None = None
        self._seen_seconds = 0.0
        self._seen_vectors = 0

    def update(self, report: dict[str, Any]) -> None:
        """Mirror one ``/csr/stats`` report (see :func:`csr_vllm.server.aggregate.aggregate`)."""
        if not report.get("active"):
            return
        lab = self.labels
        g = self.gauges
        for name, value in (
            ("csr:kv_bytes_per_token", report["kv_bytes_per_token"]),
            ("csr:dense_equivalent_bytes_per_token", report["dense_equivalent_bytes_per_token"]),
            ("csr:compression_ratio", report["compression_ratio"]),
            ("csr:kv_capacity_tokens", report["kv_capacity_tokens"]),
            ("csr:dense_equivalent_capacity_tokens", report["dense_equivalent_capacity_tokens"]),
            ("csr:guard_tokens", report["guard"]["window_tokens"]),
            ("csr:guard_bytes", report["guard"]["bytes"]),
            ("csr:outlier_vectors", report["guard"]["outlier_vectors"]),
            ("csr:sampled_atoms", report["sampled_atoms"]["live"]),
            ("csr:sampled_atom_bytes", report["sampled_atoms"]["bytes"]),
            ("csr:reconstruction_rel_error", report["reconstruction_rel_error_mean"]),
        ):
            if value is not None:
                g[name].labels(**lab).set(value)
        for kind, n in report["side_bytes"].items():
            g["csr:side_bytes"].labels(**lab, kind=kind).set(n)
        sha = next((d["sha256"] for d in report["dictionaries"] if d.get("sha256")), "")
        g["csr:info"].labels(**lab, preset=str(report["preset"]), dictionary_sha256=sha).set(1)
        if self.writer:
            self._mirror_cumulative(report["encode"])

    def _mirror_cumulative(self, enc: dict[str, Any]) -> None:
        counts = list(enc["histogram"]["counts"])
        seconds, vectors = float(enc["seconds_total"]), int(enc["vectors"])
        seen = self._seen_counts
        if seen is None or len(seen) != len(counts) or any(c < s for c, s in zip(counts, seen, strict=True)):
            seen, self._seen_seconds, self._seen_vectors = [0] * len(counts), 0.0, 0
        hist = self.encode.labels(**self.labels)
        for bucket, (c, s) in zip(hist._buckets, zip(counts, seen, strict=True), strict=True):
            if c > s:
                bucket.inc(c - s)
        if seconds > self._seen_seconds:
            hist._sum.inc(seconds - self._seen_seconds)
        if vectors > self._seen_vectors:
            self.encoded.labels(**self.labels).inc(vectors - self._seen_vectors)
        self._seen_counts, self._seen_seconds, self._seen_vectors = counts, seconds, vectors
