"""The Grafana dashboard is the generated one, and every metric it queries exists."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import vllm

from csr_vllm.server.metrics import GAUGES

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_dashboard",
                                                  GRAFANA / "make_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dashboard_file_is_the_generated_one():
    on_disk = json.loads((GRAFANA / "csr-vllm.json").read_text())
    assert on_disk == load_generator().dashboard(), "rerun deploy/grafana/make_dashboard.py"


def test_every_queried_metric_exists():
    exprs = [t["expr"] for p in load_generator().dashboard()["panels"] for t in p["targets"]]
    names = {re.sub(r"_(bucket|total|count|sum)$", "", m)
             for e in exprs for m in re.findall(r"\b((?:csr|vllm):[a-z_]+)", e)}
    ours = set(GAUGES) | {"csr:encode_seconds", "csr:encoded_vectors"}
    vllm_src = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    missing = [n for n in names if n not in ours and f'"{n}"' not in vllm_src]
    assert not missing, missing
    assert {"csr:compression_ratio", "csr:kv_capacity_tokens", "vllm:num_preemptions",
            "vllm:time_to_first_token_seconds", "vllm:num_requests_waiting"} <= names
