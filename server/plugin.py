"""The endpoint plugin: ``GET /csr/stats`` and the ``csr:`` metrics poller.

Registered as ``vllm.endpoint_plugins: csr_vllm_server``. vLLM loads endpoint plugins only when
``VLLM_PLUGINS`` names them; the ``vllm`` launcher csr-vllm installs (and ``csr-vllm serve``)
does that for ``--kv-cache-backend csr`` when ``VLLM_PLUGINS`` is unset (see
:func:`csr_vllm.vllm_launcher.plugin_allowlist`). With vLLM's own ``vllm`` script, set
``VLLM_PLUGINS`` yourself (README, "Serving").

vLLM's API-key middleware guards only ``/v1``-style prefixes, so the route checks ``--api-key``
(or ``VLLM_API_KEY``) itself, with vLLM's own token comparison.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
# Seconds between metric refreshes (each is one collective_rpc between engine steps).
INTERVAL_ENV = "CSR_VLLM_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
RPC_TIMEOUT_S = 30.0

router = APIRouter()
_METRICS: CSRMetrics | None = None  # prometheus_client allows one registration per process


class CSRServerState:
    """Per-app state: the engine client, the accepted API keys and the metrics."""

    def __init__(self, engine_client: Any, tokens: list[str], metrics: CSRMetrics | None) -> None:
        self.engine_client = engine_client
        self.metrics = metrics
        self.poller: asyncio.Task | None = None
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

    async def poll(self, interval: float) -> None:
        """Refresh the metrics every ``interval`` s until CSR turns out to be off."""
        while True:
            try:
                if not (await self.report()).get("active"):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the engine may be busy starting or shutting down
                logger.warning("CSR metrics refresh failed: %s", e)
            await asyncio.sleep(interval)


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
    """``vllm.endpoint_plugins`` entry: adds ``/csr/stats`` and starts the metrics poller."""

    name = PLUGIN_NAME
    # Needs an engine (not vLLM's engine-less render server).
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        global _METRICS
        if engine_client is None:
            return
        import vllm.envs as envs

        tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
        if _METRICS is None:
            served = engine_client.vllm_config.model_config.served_model_name
            model_name = served[0] if isinstance(served, (list, tuple)) else str(served)
            client = getattr(getattr(engine_client, "engine_core", None), "client_index", 0)
            _METRICS = CSRMetrics(model_name, ENCODE_BUCKETS, writer=client == 0)
        state.csr = CSRServerState(engine_client, tokens, _METRICS)
        interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
        state.csr.poller = asyncio.create_task(state.csr.poll(interval),
                                               name="csr-metrics-poller")
