"""ONNX Runtime GenAI model folders: what the source's ``genai_config.json`` tells the compiler.

The GenAI model builder (``onnxruntime_genai.models.builder``) declares the KV cache's last axis
symbolic (``kv_cache_dim``); the head size it stands for is in ``genai_config.json`` beside the
model (``model.decoder.head_size``). Calibration needs it to synthesize an empty past.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

CONFIG_NAME = "genai_config.json"


def read_config(model_path: str | Path) -> dict | None:
    """The ``genai_config.json`` beside ``model_path``, or None when there is none."""
    path = Path(model_path).parent / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def kv_head_size(model_path: str | Path) -> int | None:
    """Head size of the KV cache from the GenAI config beside the model (the builder declares the
    cache's last axis symbolic, ``kv_cache_dim``), or None when no config says."""
    config = read_config(model_path) or {}
    size = config.get("model", {}).get("decoder", {}).get("head_size")
    return int(size) if size else None
