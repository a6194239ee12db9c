"""Tiny onnxruntime-genai model folders for tests: a random LLaMA through the GenAI model builder.

``build_tiny_genai_model(tmp_path)`` saves ``save_tiny_llama(tmp_path / "hf", tokenizer="bpe")``
(a byte-level BPE tokenizer: onnxruntime-genai's tokenizer cannot read the word-level one) and
runs ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu`` on it into ``tmp_path /
"genai"`` (about 5 s): ``model.onnx`` (GroupQueryAttention, KV cache), ``model.onnx.data``,
``genai_config.json`` and the tokenizer. Use it from a module- or session-scoped fixture.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fptq_onnx.models._tiny import save_tiny_llama

HF_FOLDER, GENAI_FOLDER = "hf", "genai"


def build_tiny_genai_model(tmp_path: Path) -> Path:
    """The GenAI folder ``tmp_path / "genai"`` of a tiny random LLaMA saved in ``tmp_path / "hf"``."""
    hf = save_tiny_llama(Path(tmp_path) / HF_FOLDER, tokenizer="bpe")
    out = Path(tmp_path) / GENAI_FOLDER
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp_path) / "builder-cache")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"the GenAI model builder failed on the tiny LLaMA: {last}")
    return out
