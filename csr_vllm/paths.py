"""Where csr-vllm keeps what it builds (models, dictionaries, datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root cache directory: ``$CSR_VLLM_CACHE`` or ``~/.cache/csr-vllm``."""
    env = os.environ.get("CSR_VLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "csr-vllm"
