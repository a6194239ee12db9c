"""The tokenizer beside a model, without torch or transformers: ``tokenizers`` + the config JSON.

Calibration and evaluation both cut text into windows of token ids, and both must start each
window with the BOS token exactly when the model was trained that way (Gemma-3 scores ~70
instead of ~27 on Brown without its ``<bos>``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .errors import UserError


@dataclasses.dataclass
class TextTokenizer:
    """Token ids from text, and the BOS id to put in front of each window (None: no BOS)."""

    backend: object  # tokenizers.Tokenizer
    bos_id: int | None

    @property
    def lead(self) -> list[int]:
        """What starts every sequence the model sees: ``[bos_id]``, or nothing."""
        return [] if self.bos_id is None else [self.bos_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def prompt(self, text: str) -> list[int]:
        """A generation prompt: ``text``'s ids led by BOS when the model expects it."""
        return self.lead + self.encode(text)

    def windows(self, ids: list[int], length: int) -> list[list[int]]:
        """Non-overlapping windows of ``length`` ids, each led by BOS when the model expects it."""
        body = length - len(self.lead)
        return [self.lead + ids[start:start + body] for start in range(0, len(ids) - body + 1, body)]


def tokenizer_config(folder: Path) -> dict:
    """``folder/tokenizer_config.json`` ({} when absent); a one-line error when unreadable."""
    path = Path(folder) / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def special_token(config: dict, role: str) -> str | None:
    """The text of ``<role>_token`` (bos, eos, pad) in a tokenizer config: a string, or an
    ``AddedToken`` dict's ``content``; None when absent."""
    token = config.get(f"{role}_token")
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _bos_id(folder: Path, backend) -> int | None:
    """The BOS id if the tokenizer adds one by default, read from tokenizer_config.json.

    ``add_bos_token`` is explicit in LLaMA/Gemma configs; when absent, a tokenizer whose
    post-processor inserts a BOS (seen by encoding an empty string with special tokens) counts.
    """
    config = tokenizer_config(folder)
    bos = special_token(config, "bos")
    bos_id = backend.token_to_id(bos) if bos is not None else None
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        added = backend.encode("", add_special_tokens=True).ids
        return added[0] if added and added[0] == bos_id else None
    return bos_id if add_bos and bos_id is not None else None


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """Load ``folder/tokenizer.json``; a one-line :class:`UserError` if it is not there."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer.json in {folder}: pass --tokenizer DIR (a folder with tokenizer.json)")
    try:
        from tokenizers import Tokenizer
    except ImportError as error:  # pragma: no cover - tokenizers is a dependency of the llm extra
        raise UserError("reading text needs the 'tokenizers' package: pip install 'fptq-onnx[llm]'") from error
    backend = Tokenizer.from_file(str(path))
    return TextTokenizer(backend=backend, bos_id=_bos_id(folder, backend))


def find_tokenizer(model_path: str | Path) -> Path | None:
    """The tokenizer folder saved beside an exported model: the model's own folder or ``<stem>.tokenizer/``."""
    model_path = Path(model_path)
    for folder in (model_path.parent, model_path.with_suffix(".tokenizer")):
        if (folder / "tokenizer.json").is_file():
            return folder
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")


def copy_tokenizer(model_path: str | os.PathLike, dest_model_path: str | os.PathLike) -> Path | None:
    """Copy the tokenizer of ``model_path`` next to ``dest_model_path``; returns its new folder.

    Does nothing (and returns the folder) when both models are in the same folder or the
    destination already has a tokenizer; returns None when ``model_path`` has no tokenizer.
    """
    src = find_tokenizer(model_path)
    dest = Path(dest_model_path).parent
    if src is None:
        return None
    if src.resolve() != dest.resolve() and not (dest / "tokenizer.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
    return dest
