"""ONNX Runtime GenAI model folders: what the source's ``genai_config.json`` tells the compiler,
and the folder ``convert`` writes so that ``onnxruntime_genai.Model(folder)`` runs the result.

The GenAI model builder (``onnxruntime_genai.models.builder``) declares the KV cache's last axis
symbolic (``kv_cache_dim``); the head size it stands for is in ``genai_config.json`` beside the
model (``model.decoder.head_size``). Calibration needs it to synthesize an empty past.

A converted model's folder holds, beside ``model.onnx``:

* ``genai_config.json``: the source's, with ``decoder.filename`` naming the converted file and
  ``decoder.session_options.custom_ops_library`` naming our op library; or, for a model with a
  KV cache and no config (``fptq-onnx export --with-past``, optimum's layout), a new one of model
  type ``decoder`` read off the graph and the tokenizer (:func:`new_config`);
* ``libfptq_ops.so``, copied: GenAI loads a custom-op library only from inside the model
  folder, the working directory or an execution provider's library folder, so a relative name in
  the config is the one spelling that works wherever the folder is moved.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnx

from .errors import UserError
from .model_io import replace_file
from .tokenizer import special_token, tokenizer_config

CONFIG_NAME = "genai_config.json"
LIBRARY_NAME = "libfptq_ops.so"  # as fptq_onnx.session names it (not imported: session pulls in onnxruntime)
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


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


def converted_config(source: dict, model_file: str, with_library: bool = True) -> dict:
    """``source`` (a GenAI config) for the converted model ``model_file``: the decoder reads that
    file and (``with_library``) loads our op library; everything else (search options,
    providers) is kept. Without the library GenAI runs the ops' function bodies."""
    config = copy.deepcopy(source)
    decoder = config.setdefault("model", {}).setdefault("decoder", {})
    decoder["filename"] = model_file
    options = decoder.setdefault("session_options", {})
    if with_library:
        options["custom_ops_library"] = LIBRARY_NAME
    else:
        options.pop("custom_ops_library", None)
    return config


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def new_config(model: onnx.ModelProto, model_file: str, tokenizer_dir: Path | None,
               with_library: bool = True) -> dict | None:
    """A GenAI config (model type ``decoder``) for a KV-cache model that came without one, or None
    when the model has no ``past_key_values.N.key`` / ``present.N.key`` cache (GenAI runs only
    models with a cache).

    The geometry comes from the graph: layers = number of past keys, KV heads and head size = the
    fixed axes 1 and 3 of ``past_key_values.0.key`` ``[batch, kv_heads, past, head_size]``,
    vocabulary = the last axis of ``logits``. The cache is concatenated by the model (present =
    past + new), not written into a shared buffer: ``past_present_share_buffer`` false. Token ids
    come from the tokenizer's config (``bos/eos/pad_token``).
    """
    inputs = {value.name: value for value in model.graph.input}
    outputs = {value.name: value for value in model.graph.output}
    layers = sum(PAST_KEY % i in inputs for i in range(len(inputs)))
    if not layers or PRESENT_KEY % 0 not in outputs or "logits" not in outputs or "input_ids" not in inputs:
        return None
    past = _dims(inputs[PAST_KEY % 0])
    if len(past) != 4 or not all(isinstance(d, int) and d > 0 for d in (past[1], past[3])):
        return None
    vocab = _dims(outputs["logits"])[-1]
    token_ids = _token_ids(tokenizer_dir)
    decoder = {
        "filename": model_file,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []}
                           | ({"custom_ops_library": LIBRARY_NAME} if with_library else {}),
        "head_size": past[3], "hidden_size": past[1] * past[3],
        "num_attention_heads": past[1], "num_key_value_heads": past[1], "num_hidden_layers": layers,
        "inputs": {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
                  | {"past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
        "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }
    context = 4096
    return {
        "model": {"type": "decoder", "context_length": context, "decoder": decoder,
                  **({"vocab_size": vocab} if isinstance(vocab, int) else {}), **token_ids},
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def _token_ids(tokenizer_dir: Path | None) -> dict[str, int]:
    """``bos/eos/pad_token_id`` from the tokenizer files (pad defaults to eos, as GenAI's builder does)."""
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    config = tokenizer_config(tokenizer_dir)
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = special_token(config, role)
        token_id = backend.token_to_id(token) if token is not None else None
        if token_id is not None:
            ids[f"{role}_token_id"] = token_id
    if "eos_token_id" in ids:
        ids.setdefault("pad_token_id", ids["eos_token_id"])
    return ids


def write_model_folder(source_model: Path, converted: onnx.ModelProto, output_path: Path,
                       library: str | None, tokenizer_dir: Path | None) -> Path | None:
    """Make ``output_path``'s folder a GenAI model folder: write its ``genai_config.json``
    (:func:`converted_config` of the source's, else :func:`new_config`) and copy ``library`` into
    it. Returns the config's path, or None when the model is not one GenAI can run (no cache) and
    nothing was written. Each file is written to a temporary name and renamed into place."""
    source = read_config(source_model)
    with_library = library is not None
    config = (converted_config(source, output_path.name, with_library) if source is not None
              else new_config(converted, output_path.name, tokenizer_dir, with_library))
    if config is None:
        return None
    folder = output_path.parent
    if with_library and Path(library).resolve() != (folder / LIBRARY_NAME).resolve():
        replace_file(folder / LIBRARY_NAME, lambda staged: shutil.copyfile(library, staged), executable=True)
    target = folder / CONFIG_NAME
    replace_file(target, lambda staged: staged.write_text(json.dumps(config, indent=2) + "\n"))
    return target
