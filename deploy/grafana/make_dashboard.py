"""Writes deploy/grafana/csr-vllm.json, the Grafana dashboard for csr-vllm next to vLLM's
metrics. Rerun after changing a panel: ``python deploy/grafana/make_dashboard.py``.
(Generated rather than hand-edited so every expression is checked against the metric names
by tests/test_dashboard.py.)"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("csr-vllm.json")
SEL = '{model_name=~"$model_name"}'


def panel(pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int,
          w: int = 12, h: int = 8, kind: str = "timeseries", description: str = "") -> dict:
    return {
        "id": pid, "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": leg,
                     "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}}
                    for i, (e, leg) in enumerate(exprs)],
    }


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{SEL}[$__rate_interval])))",
             f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


def dashboard() -> dict:
    panels = [
        panel(1, "KV memory saved (compression ratio)",
              [(f"csr:compression_ratio{SEL}", "dense bytes / CSR bytes per token")],
              "x", 0, 0, 6, 6, "stat",
              "Bytes a token takes in bf16 over the bytes it takes in CSR pages."),
        panel(2, "KV token capacity: CSR vs bf16 in the same memory",
              [(f"csr:kv_capacity_tokens{SEL}", "CSR"),
               (f"csr:dense_equivalent_capacity_tokens{SEL}", "bf16 (same pool bytes)")],
              "short", 6, 0, 9, 6, "bargauge"),
        panel(3, "Bytes per token",
              [(f"csr:kv_bytes_per_token{SEL}", "CSR"),
               (f"csr:dense_equivalent_bytes_per_token{SEL}", "bf16")],
              "bytes", 15, 0, 9, 6, "bargauge"),
        panel(4, "KV cache usage", [(f"vllm:kv_cache_usage_perc{SEL}", "used")],
              "percentunit", 0, 6),
        panel(5, "Requests running / waiting",
              [(f"vllm:num_requests_running{SEL}", "running"),
               (f"vllm:num_requests_waiting{SEL}", "waiting")], "short", 12, 6),
        panel(6, "Preemptions per second",
              [(f"rate(vllm:num_preemptions_total{SEL}[$__rate_interval])", "preemptions")],
              "ops", 0, 14),
        panel(7, "Output tokens per second",
              [(f"rate(vllm:generation_tokens_total{SEL}[$__rate_interval])", "tokens/s")],
              "short", 12, 14),
        panel(8, "Time to first token", quantiles("vllm:time_to_first_token_seconds"),
              "s", 0, 22),
        panel(9, "Time per output token", quantiles("vllm:inter_token_latency_seconds"),
              "s", 12, 22),
        panel(10, "Memory outside the KV pool",
              [(f"csr:side_bytes{SEL}", "{{kind}}"), (f"csr:guard_bytes{SEL}", "Guard pools")],
              "bytes", 0, 30),
        panel(11, "Guard and sampled atoms",
              [(f"csr:guard_tokens{SEL}", "dense window tokens"),
               (f"csr:outlier_vectors{SEL}", "outlier vectors"),
               (f"csr:sampled_atoms{SEL}", "sampled atoms")], "short", 12, 30),
        panel(12, "CSR encode time per call", quantiles("csr:encode_seconds"), "s", 0, 38),
        panel(13, "Reconstruction error (sampled)",
              [(f"csr:reconstruction_rel_error{SEL}", "relative L2")], "percentunit", 12, 38),
    ]
    return {
        "title": "csr-vllm: CSR KV cache on vLLM",
        "uid": "csr-vllm",
        "tags": ["vllm", "csr-vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "templating": {"list": [
            {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus"},
            {"name": "model_name", "type": "query", "includeAll": True, "multi": True,
             "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
             "query": "label_values(csr:info, model_name)", "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(OUT)
