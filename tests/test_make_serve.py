"""The README's first command: ``make serve`` (= ``.venv/bin/csr-vllm serve``) with no
environment variables, exactly as a user runs it, answers a chat completion and stops cleanly.

Every other server test sizes the KV pool itself (``VLLM_CPU_KVCACHE_SPACE``); this one must
not: the pool is csr-vllm's own choice (``csr_vllm.kv_budget``). One start, ~1-2 minutes here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from csr_vllm.server.launch import free_port, get_json

pytestmark = pytest.mark.slow

CLI = Path(sys.executable).parent / "csr-vllm"  # .venv/bin/csr-vllm, what `make serve` runs
# Variables that would size the pool or pick the device for it: a user running `make serve`
# has none of them.
SIZING_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_TARGET_DEVICE",
              "VLLM_PLUGINS", "CUDA_VISIBLE_DEVICES")
# `csr-vllm serve` flags besides the port: none, the default dictionary (a faster test
# dictionary could be named here with --dict).
SERVE_ARGS: list[str] = []
START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 90.0


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SIZING_ENV}
    env["PYTHONUNBUFFERED"] = "1"  # the log in order, as a terminal would show it
    return env


def wait_for_line(log: Path, proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """The first log line matching ``pattern``; fails with the log tail if the process exits
    first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if m:
            return m.group(0)
        if proc.poll() is not None:
            break
        time.sleep(1.0)
    pytest.fail(f"no line matching {pattern!r} (exit code {proc.poll()}); log tail:\n"
                f"{log.read_text(errors='replace')[-4000:]}")


def chat(base: str, model: str, text: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def rss_by_role(procs) -> dict[str, int]:
    """RSS (bytes) of the CLI, vLLM's API server, EngineCore and its worker, by command line
    (vLLM renames its processes ``VLLM::EngineCore``, ``VLLM::Worker...``)."""
    out: dict[str, int] = {}
    for p in procs:
        try:
            cmd, rss = " ".join(p.cmdline()), p.memory_info().rss
        except psutil_errors():
            continue
        role = ("api_server" if "csr_vllm.vllm_launcher serve" in cmd else
                "cli" if "bin/csr-vllm serve" in cmd else
                "engine_core" if "EngineCore" in cmd else
                "worker" if "VLLM::Worker" in cmd else "other")
        out[role] = out.get(role, 0) + rss
    return out


def psutil_errors() -> tuple[type[Exception], ...]:
    import psutil

    return (psutil.NoSuchProcess, psutil.AccessDenied)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Signal the server's process group (as a service manager or Ctrl-C does) and wait."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"csr-vllm serve did not stop within {STOP_TIMEOUT_S:.0f} s of {sig!r}")


def alive(procs) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != "zombie":
                out.append(p)
        except psutil_errors():
            pass
    return out


def test_make_serve_answers_a_chat_completion_and_stops_cleanly(default_dict, tmp_path,
                                                                record_property):
    import psutil

    assert CLI.is_file(), f"{CLI} is missing: run `make setup`"
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(CLI), "serve", "--port", str(port), *SERVE_ARGS],
                                env=user_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    family: list = []
    try:
        budget = wait_for_line(log, proc, r"^KV budget: .*$", START_TIMEOUT_S)
        capacity = wait_for_line(log, proc, r"^KV cache: .*$", START_TIMEOUT_S)
        base = f"http://127.0.0.1:{port}"
        model = get_json(base + "/v1/models")["data"][0]["id"]
        r = chat(base, model, "What is the capital of France?", max_tokens=4)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        rss = rss_by_role(family)
    finally:
        family = family or ([psutil.Process(proc.pid),
                             *psutil.Process(proc.pid).children(recursive=True)]
                            if proc.poll() is None else [])
        code = stop_group(proc) if proc.poll() is None else proc.returncode
    print(budget, capacity, f"RSS MiB: { {k: v // 2**20 for k, v in rss.items()} }",
          f"exit code {code}", sep="\n")
    record_property("kv_budget_line", budget)
    record_property("capacity_line", capacity)
    record_property("rss_mib", {k: v // 2**20 for k, v in rss.items()})

    # It chose the pool itself, said why, and served with it.
    assert "--kv-cache-memory-bytes" in budget and "free on NUMA node" in budget
    chosen = int(budget.split("--kv-cache-memory-bytes ")[1].split(")")[0])
    assert re.search(r"tokens with csr-2b .* in the same \d+\.\d\d GiB: \d+\.\dx", capacity)
    pool_gib = float(capacity.split("in the same ")[1].split(" GiB")[0])
    assert pool_gib == pytest.approx(chosen / 2**30, abs=0.01)
    # A greedy answer of the 4 tokens asked for (or fewer, ending).
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert r["usage"]["completion_tokens"] == 4 or choice["finish_reason"] == "stop"
    # Stopped as asked, every process it started gone (no orphan EngineCore).
    assert len(family) >= 3, [p.cmdline() for p in family]  # CLI, API server, EngineCore
    deadline = time.monotonic() + 30
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(family)
    for p in left:
        p.kill()
    assert not left, [(p.pid, p.name()) for p in left]
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()[-3000:]
