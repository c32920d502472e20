"""Run ``vllm serve`` as a child process and say what it got once it listens.

``csr-vllm serve`` (``make serve``) uses this: it starts vLLM's server, waits for ``/health``,
reads ``/csr/stats`` and prints the URL and the KV capacity against bf16 at the same memory,
then stays in the foreground until the server exits (Ctrl-C stops both).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

HEALTH_TIMEOUT_S = 900.0  # first start compiles nothing on CPU but may build a dictionary


def get_json(url: str, api_key: str | None = None, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True once ``base/health`` answers 200; False if the server exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    return False


def capacity_line(stats: dict[str, Any]) -> str:
    """One line on the KV capacity CSR got versus bf16 at the same pool bytes."""
    if not stats.get("active"):
        return "KV cache:   dense (CSR is not active)"
    cap, dense = stats["kv_capacity_tokens"], stats["dense_equivalent_capacity_tokens"]
    return (f"KV cache:   {cap:,} tokens with {stats['preset']} "
            f"({stats['kv_bytes_per_token']:,} B/token) vs {dense:,} tokens in bf16 "
            f"({stats['dense_equivalent_bytes_per_token']:,} B/token) in the same "
            f"{stats['kv_pool_bytes'] / 2**30:.2f} GiB: {cap / dense:.1f}x" + (
                f"; layers {', '.join(map(str, stats['dense_layers']))} kept dense beside the "
                "pool (side_bytes.dense_layers in /csr/stats)" if stats.get("dense_layers")
                else ""))


def serve_and_report(cmd: list[str], base: str, api_key: str | None = None) -> int:
    """Run ``cmd`` (a ``vllm serve`` command line); print capacity once healthy; return its
    exit code."""
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    if wait_healthy(base, proc):
        try:
            stats = get_json(base + "/csr/stats", api_key)
            print(f"URL:        {base}/v1 (OpenAI API; /csr/stats, /metrics)", flush=True)
            print(capacity_line(stats), flush=True)
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            print(f"URL:        {base}/v1 (could not read /csr/stats: {e})", flush=True)
    return proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``vllm serve`` child for tests and benchmarks: started on a free port, waited for,
    stopped (SIGINT, then SIGKILL) on exit. ``log`` collects its stdout and stderr."""

    def __init__(self, model: str, flags: list[str], env: dict[str, str] | None = None,
                 log_path: str | None = None, port: int | None = None) -> None:
        import os
        import sys
        import tempfile

        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "csr_vllm.vllm_launcher", "serve", model,
                    "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> ServerProcess:
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it (several servers then start at once)."""
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = HEALTH_TIMEOUT_S) -> ServerProcess:
        """Wait until it answers /health; a server that dies or never answers is stopped and
        raises with its log's tail."""
        if not wait_healthy(self.base, self.proc, timeout):
            self.stop()
            raise RuntimeError(f"vllm serve did not become healthy (exit code "
                               f"{self.proc.returncode}); log tail:\n{self.log()[-4000:]}")
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int | None:
        import os

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
