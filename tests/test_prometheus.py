"""The Grafana dashboard against a real Prometheus scraping a real ``vllm serve``.

tests/test_dashboard.py checks that every metric the dashboard names exists; this module checks
that every panel's PromQL, evaluated by Prometheus over what it scraped from a CSR server that
served a few chat requests, returns data, and that the memory-saved panels show what
``/csr/stats`` reports.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``; it is run here with its
own config, storage and port, not as the system service) or ``$PROMETHEUS`` pointing at one.
Run it with ``python -m pytest -m heavy tests/test_prometheus.py -s`` (-s prints what each
panel returned; about a minute here, the server start included).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from csr_vllm.server.launch import ServerProcess, free_port, get_json

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "csr-vllm.json"
SCRAPE_S = 1
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval); a
# dashboard viewed over the last minutes gets tens of seconds. Long enough here to span the
# scrapes before and after the chat requests, so every rate() sees the traffic.
RATE_INTERVAL = "2m"
CHATS = ["Name three colours of the rainbow.", "What is the capital of France?",
         "Write one sentence about the sea.", "Count from one to five."]
# Panels whose value /csr/stats gives directly: panel title -> {legend: /csr/stats key}.
MEMORY_PANELS = {
    "KV memory saved (compression ratio)": {
        "dense bytes / CSR bytes per token": "compression_ratio"},
    "KV token capacity: CSR vs bf16 in the same memory": {
        "CSR": "kv_capacity_tokens", "bf16 (same pool bytes)": "dense_equivalent_capacity_tokens"},
    "Bytes per token": {"CSR": "kv_bytes_per_token", "bf16": "dense_equivalent_bytes_per_token"},
}


def prometheus_binary() -> str | None:
    return os.environ.get("PROMETHEUS") or shutil.which("prometheus")


# A skipif mark, not a skip in a fixture: pytest sets up session fixtures (the default model
# and dictionary, trained on first use) before module ones.
pytestmark = [pytest.mark.heavy, pytest.mark.skipif(
    prometheus_binary() is None,
    reason="no prometheus binary (apt-get install prometheus, or set $PROMETHEUS)")]


class Prometheus:
    """A Prometheus child scraping one target every ``SCRAPE_S`` seconds, with its storage in
    ``folder``; ``query`` and ``label_values`` use its HTTP API."""

    def __init__(self, binary: str, target: str, folder: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = folder / "prometheus.yml"
        # JSON is YAML; the scrape timeout must not exceed the interval.
        config.write_text(json.dumps({
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                       "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [{"job_name": "csr-vllm", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log_path = folder / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log_path.read_text()}")

    def _api(self, path: str, **params: str) -> dict:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = get_json(url)
        except urllib.error.HTTPError as e:  # a bad expression: Prometheus says why
            raise AssertionError(f"{params}: {e.read().decode()}") from e
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant vector at the current time: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        data = self._api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """Grafana's ``label_values(match, label)`` (the variable query), as Grafana asks it."""
        return self._api(f"label/{label}/values", **{"match[]": match})

    def wait_for(self, expr: str, ok, timeout: float = 120.0) -> list[dict]:
        """Poll ``expr`` until ``ok(result)``; the last result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(SCRAPE_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def grafana_regex(values: list[str]) -> str:
    """What Grafana puts for a multi-value/"All" variable inside ``=~"..."``: each value with
    its regex metacharacters escaped (doubled backslash: it sits in a PromQL string), joined
    as ``(a|b)``."""
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str]) -> str:
    out = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: variables[m[1] or m[2]], expr)
    assert "$" not in out, f"unsubstituted Grafana variable in {expr!r}"
    return out


@pytest.fixture(scope="module")
def server(model_dir, default_dict):
    flags = ["--kv-cache-backend", "csr", "--csr-dict", default_dict, "--max-model-len", "512",
             "--enforce-eager"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with ServerProcess(str(model_dir), flags, env) as srv:
        yield srv


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    prom = Prometheus(prometheus_binary(), f"127.0.0.1:{server.port}",
                      tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def chat(base: str, model: str, text: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def scraped(server, prometheus, model_dir):
    """Prometheus has scraped the idle server, a few chat requests ran, and it has scraped
    the result: returns ``/csr/stats`` after the requests."""
    # The csr: series appear from the second scrape (the first one starts their refresh);
    # rate() needs samples from before the traffic too.
    up = prometheus.wait_for('count_over_time(csr:info[1m])', lambda r: r and
                             float(r[0]["value"][1]) >= 3)
    if not up:  # say what it did store (names without their ':' are client_python#1177)
        held = sorted({s["metric"]["__name__"] for s in prometheus.query(
            '{__name__=~"(csr|vllm).+"}')})
        pytest.fail(f"Prometheus holds no csr:info after 2 minutes of scrapes; its csr/vllm "
                    f"series: {held}")
    for text in CHATS:
        reply = chat(server.base, str(model_dir), text)
        assert reply["choices"][0]["message"]["content"]
    stats = get_json(server.base + "/csr/stats")
    # Several scrapes after the traffic: the refresh runs behind a scrape, so the values a
    # scrape returns are the previous refresh's.
    done = prometheus.wait_for("sum(vllm:request_success_total)",
                               lambda r: r and float(r[0]["value"][1]) >= len(CHATS))
    assert done and float(done[0]["value"][1]) >= len(CHATS), done
    time.sleep(4 * SCRAPE_S)
    return stats


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) of every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t.get("legendFormat", ""), t["expr"])
            for p in dash["panels"] for t in p["targets"]]


@pytest.fixture(scope="module")
def grafana_vars(prometheus, scraped) -> dict[str, str]:
    """The dashboard's variables as Grafana fills them: ``$model_name`` from its own query
    (``label_values(...)``) with "All" selected, ``$__rate_interval``."""
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]).groups()
    names = prometheus.label_values(label, metric)
    assert names, f"the {var['name']} variable's query {var['query']!r} finds no value"
    return {var["name"]: grafana_regex(names), "__rate_interval": RATE_INTERVAL}


def test_every_panel_returns_data(prometheus, grafana_vars, record_property):
    report, empty, not_finite = [], [], []
    for title, legend, expr in dashboard_targets():
        result = prometheus.query(substitute(expr, grafana_vars))
        values = [float(s["value"][1]) for s in result]
        report.append({"panel": title, "legend": legend, "values": values})
        if not values:
            empty.append(f"{title} / {legend}: {expr}")
        elif not all(math.isfinite(v) for v in values):
            not_finite.append(f"{title} / {legend}: {values}")
    print("\n" + "\n".join(f"{r['panel']} / {r['legend']}: {r['values']}" for r in report))
    record_property("panels", json.dumps(report))
    assert not empty, "panels without data:\n" + "\n".join(empty)
    # Every rate() window spans the traffic, so the quantiles and rates are numbers, not NaN.
    assert not not_finite, "panels with NaN/Inf:\n" + "\n".join(not_finite)


def test_memory_panels_show_what_csr_stats_reports(prometheus, scraped, grafana_vars,
                                                   record_property):
    by_panel: dict[str, dict[str, str]] = {}
    for title, legend, expr in dashboard_targets():
        by_panel.setdefault(title, {})[legend] = expr
    shown = {}
    for title, legends in MEMORY_PANELS.items():
        for legend, key in legends.items():
            (series,) = prometheus.query(substitute(by_panel[title][legend], grafana_vars))
            shown[f"{title} / {legend}"] = (float(series["value"][1]), scraped[key])
    print("\n" + "\n".join(f"{k}: Prometheus {p} /csr/stats {s}" for k, (p, s) in shown.items()))
    record_property("memory_panels", json.dumps(shown))
    # Exact: Prometheus and prometheus_client both print floats that parse back unchanged.
    assert all(p == s for p, s in shown.values()), shown
    assert scraped["compression_ratio"] == pytest.approx(8.0)  # csr-2b, the default preset
