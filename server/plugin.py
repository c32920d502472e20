"""The endpoint plugin: ``GET /csr/stats`` and the ``csr:`` metrics, refreshed on scrape.

Registered as ``vllm.endpoint_plugins: csr_vllm_server``. vLLM loads endpoint plugins only when
``VLLM_PLUGINS`` names them; the ``vllm`` launcher csr-vllm installs (and ``csr-vllm serve``)
does that for ``--kv-cache-backend csr`` when ``VLLM_PLUGINS`` is unset (see
:func:`csr_vllm.vllm_launcher.plugin_allowlist`). With vLLM's own ``vllm`` script, set
``VLLM_PLUGINS`` yourself (README, "Serving").

vLLM's API-key middleware guards only ``/v1``-style prefixes, so the route checks ``--api-key``
(or ``VLLM_API_KEY``) itself, with vLLM's own token comparison.

Why refresh on scrape and not on a timer: every ``collective_rpc`` wakes vLLM's workers, and a
worker busy-polls its shared-memory queue for a second after each message
(``shm_broadcast.MessageQueue.wait``): a timer of one second or less keeps an idle server's
worker spinning on a core forever. So the ``csr:`` metrics are refreshed just before vLLM's
``/metrics`` answers (an ASGI middleware), at most once per ``CSR_VLLM_METRICS_MIN_INTERVAL_S``
(default 1 s), and not at all while the server has seen no request since the last refresh and
has none in flight (nothing on the workers changed). The refresh runs in the background: a
scrape is answered at once with the previous refresh's values (one scrape behind at most),
because an RPC waits for the engine's current step. With several API servers, API server 0
(which writes the cumulative series) always refreshes, since traffic may reach the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from csr_vllm.engine.runtime import ENCODE_BUCKETS
from csr_vllm.server.aggregate import aggregate
from csr_vllm.server.metrics import CSRMetrics

logger = logging.getLogger("vllm.csr_vllm.server")

PLUGIN_NAME = "csr_vllm_server"
STATS_PATH = "/csr/stats"
# Least seconds between two refreshes of the metrics (each is one collective_rpc).
MIN_INTERVAL_ENV = "CSR_VLLM_METRICS_MIN_INTERVAL_S"
DEFAULT_MIN_INTERVAL_S = 1.0
RPC_TIMEOUT_S = 30.0
# Requests that do not touch the engine (they never make a refresh necessary).
_QUIET_PATHS = ("/metrics", "/health", "/ping", "/load", "/version", STATS_PATH)

router = APIRouter()
_METRICS: CSRMetrics | None = None  # prometheus_client allows one registration per process


class CSRServerState:
    """Per-app state: the engine client, the accepted API keys and the metrics."""

    def __init__(self, engine_client: Any, tokens: list[str], metrics: CSRMetrics | None,
                 min_interval: float = DEFAULT_MIN_INTERVAL_S, skip_when_idle: bool = True) -> None:
        self.engine_client = engine_client
        self.metrics = metrics
        self.min_interval, self.skip_when_idle = min_interval, skip_when_idle
        self.activity = 0  # engine-facing requests this process has seen
        self.refreshes = 0
        self._seen_activity = -1
        self._last_refresh = float("-inf")
        self._active: bool | None = None  # None: not asked yet; False: CSR is off
        self._task: asyncio.Task | None = None
        self._auth = None
        if tokens:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

            self._auth = AuthenticationMiddleware(app=None, tokens=tokens)

    def authorized(self, headers: Any) -> bool:
        return self._auth is None or self._auth.verify_token(headers)

    async def report(self) -> dict[str, Any]:
        """Ask every worker, fold the answers (see :func:`aggregate`)."""
        workers = await self.engine_client.collective_rpc("csr_stats", timeout=RPC_TIMEOUT_S)
        cache = self.engine_client.vllm_config.cache_config
        report = aggregate(list(workers), cache.num_gpu_blocks, cache.block_size)
        if self.metrics is not None:
            self.metrics.update(report)
        return report

    def _idle(self) -> bool:
        """No request seen since the last refresh and none in flight in this process."""
        if self.activity != self._seen_activity:
            return False
        proc = getattr(self.engine_client, "output_processor", None)
        return proc is not None and proc.get_num_unfinished_requests() == 0

    async def refresh_for_scrape(self, wait: bool = False) -> None:
        """Bring the metrics up to date for ``/metrics`` (see module docstring).

        The refresh runs in the background and the scrape is answered at once with the values
        of the previous refresh: an RPC waits for the engine's current step, and a scrape must
        not (Prometheus times out). ``wait``: await the refresh (tests)."""
        if self.metrics is None or self._active is False:
            return
        if self._task is None or self._task.done():
            now = time.monotonic()
            if now - self._last_refresh < self.min_interval or (
                    self.skip_when_idle and self._idle()):
                return
            self._last_refresh = now
            self._task = asyncio.create_task(self._refresh(self.activity))
        if wait:
            await self._task

    async def _refresh(self, activity: int) -> None:
        try:
            self._active = bool((await self.report()).get("active"))
        except Exception as e:  # the engine may be starting or shutting down
            logger.warning("CSR metrics refresh failed: %s", e)
            return
        self.refreshes += 1
        self._seen_activity = activity


class RefreshOnScrape:
    """ASGI middleware: counts engine-facing requests and refreshes the ``csr:`` metrics just
    before vLLM's ``/metrics`` route answers."""

    def __init__(self, app: Any, fastapi_app: FastAPI) -> None:
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        state: CSRServerState | None = getattr(self.fastapi_app.state, "csr", None)
        if state is not None and scope["type"] == "http":
            path = scope.get("path", "")
            if path.startswith("/metrics") and scope.get("method") == "GET":
                await state.refresh_for_scrape()
            elif not path.startswith(_QUIET_PATHS):
                state.activity += 1
        await self.app(scope, receive, send)


@router.get(STATS_PATH)
async def csr_stats(request: Request) -> JSONResponse:
    """The CSR KV cache as the workers see it (JSON; see ``aggregate``)."""
    state: CSRServerState | None = getattr(request.app.state, "csr", None)
    if state is None:
        return _error(503, "the CSR stats endpoint has no engine", "ServiceUnavailableError")
    if not state.authorized(request.headers):
        return JSONResponse(content={"error": "Unauthorized"}, status_code=401)
    try:
        return JSONResponse(await state.report())
    except Exception as e:
        logger.exception("CSR stats failed")
        return _error(503, f"the engine did not answer csr_stats: {e}", "ServiceUnavailableError")


def _error(code: int, message: str, kind: str) -> JSONResponse:
    # The OpenAI error shape vLLM's own routes use.
    return JSONResponse(status_code=code,
                        content={"error": {"message": message, "type": kind, "param": None,
                                           "code": code}})


class CSRServerPlugin:
    """``vllm.endpoint_plugins`` entry: adds ``/csr/stats`` and refreshes the csr: metrics on scrape."""

    name = PLUGIN_NAME
    # Needs an engine (not vLLM's engine-less render server).
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.add_middleware(RefreshOnScrape, fastapi_app=app)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        global _METRICS
        if engine_client is None:
            return
        import vllm.envs as envs

        tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        client = getattr(getattr(engine_client, "engine_core", None), "client_index", 0)
        if _METRICS is None:
            served = engine_client.vllm_config.model_config.served_model_name
            model_name = served[0] if isinstance(served, (list, tuple)) else str(served)
            _METRICS = CSRMetrics(model_name, ENCODE_BUCKETS, writer=client == 0)
        several = (getattr(args, "api_server_count", None) or 1) > 1
        state.csr = CSRServerState(
            engine_client, tokens, _METRICS,
            min_interval=float(os.environ.get(MIN_INTERVAL_ENV, DEFAULT_MIN_INTERVAL_S)),
            # API server 0 writes the cumulative series; traffic may reach only the others.
            skip_when_idle=not (several and client == 0))
