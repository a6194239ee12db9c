"""Greedy generation with ONNX Runtime, for models with or without a KV cache.

A model **without** cache (``input_ids``, optional ``attention_mask`` / ``position_ids`` ->
``logits``) recomputes the whole sequence at every step. A model **with** cache
(``fptq-onnx export --with-past``, optimum's ``text-generation-with-past`` layout) takes
``past_key_values.N.key`` / ``.value`` and returns ``present.N.key`` / ``.value``: the prompt is
run once with an empty past (length 0), then one token per step with the previous ``present``
as ``past``. Both give the same tokens up to float rounding, which is what makes the cache path
testable: a converted model must produce the same tokens with and without its cache.

>>> import onnxruntime as ort                                               # doctest: +SKIP
>>> session = ort.InferenceSession("model.onnx")                           # doctest: +SKIP
>>> greedy_generate(session, [1, 504, 3458], new_tokens=4)                 # doctest: +SKIP
[28, 253, 1070, 30]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .genai import kv_head_size

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
LOGITS = "logits"
# the prompts of the KV-cache generation check (tests/test_kv_cache.py, benchmarks/accuracy.py)
PROMPTS = ("The capital of France is", "Once upon a time, there was a little", "The three primary colors are",
           "To bake bread, you first need to", "The largest planet in our solar system is")


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """``x_(1) - x_(2)``, the largest minus the second largest value over the last axis (the
    same for logits and their log-softmax): how far the model is from changing its top-1."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def past_inputs(session) -> list:
    """The session's ``past_key_values.*`` inputs (empty for a model without cache)."""
    return [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]


def empty_past_shape(shape: Sequence, batch: int, head_size: int | None = None) -> list[int]:
    """Shape of a zero-length past for a cache input declared ``shape`` (ints fixed, anything
    else symbolic): ``[batch, heads, 0, head_dim]``. A symbolic last axis (the GenAI builder's
    ``kv_cache_dim``) takes ``head_size``; other symbolic axes are the past length, 0."""
    result = []
    for axis, size in enumerate(shape):
        if axis == 0:
            result.append(batch)
        elif isinstance(size, int) and size > 0:
            result.append(size)
        elif axis == len(shape) - 1 and len(shape) == 4:
            if not head_size:
                raise ValueError(f"the cache's head size is symbolic ({shape}) and no genai_config.json says it")
            result.append(head_size)
        else:
            result.append(0)
    return result


def empty_past(session, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past tensors for the first step, one per ``past_key_values.*`` input
    (:func:`empty_past_shape`; the head size from the GenAI config beside the model)."""
    # onnxruntime.InferenceSession keeps the path it loaded as _model_path (None from bytes)
    head_size = kv_head_size(session._model_path) if getattr(session, "_model_path", None) else None
    return {item.name: np.zeros(empty_past_shape(item.shape, batch, head_size), numpy_type(item.type))
            for item in past_inputs(session)}


def run_step(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
             past_length: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward pass on token ids ``[batch, sequence]``: ``(logits, next past)``.

    For a model with cache, ``past`` holds ``past_length`` earlier positions (None: empty) and
    the next past is this step's ``present``; for one without, ``ids`` is the whole sequence and
    the next past is empty. ``attention_mask`` (all ones) and ``position_ids`` are fed when the
    model takes them.
    """
    names = {i.name: i for i in session.get_inputs()}
    batch, length = ids.shape
    feed = {"input_ids": ids.astype(numpy_type(names["input_ids"].type))}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((batch, past_length + length), numpy_type(names["attention_mask"].type))
    if "position_ids" in names:
        positions = np.arange(past_length, past_length + length)
        feed["position_ids"] = np.broadcast_to(positions, (batch, length)).astype(numpy_type(names["position_ids"].type))
    if past_inputs(session):
        feed.update(past if past is not None else empty_past(session, batch))
    outputs = [o.name for o in session.get_outputs()]
    values = dict(zip(outputs, session.run(outputs, feed)))
    present = {PAST_PREFIX + name[len(PRESENT_PREFIX):]: value for name, value in values.items()
               if name.startswith(PRESENT_PREFIX)}
    return values[LOGITS], present


def greedy_generate(session, prompt_ids: Sequence[int], new_tokens: int, use_cache: bool = True) -> list[int]:
    """The ``new_tokens`` token ids that greedy decoding (argmax of the last logits) appends to
    ``prompt_ids`` (batch 1), using the KV cache when the model has one and ``use_cache``;
    ``use_cache=False`` recomputes the whole sequence each step (with an empty past)."""
    if new_tokens < 0 or not len(prompt_ids):
        raise ValueError(f"need a non-empty prompt and new_tokens >= 0, got {len(prompt_ids)} and {new_tokens}")
    sequence = [int(t) for t in prompt_ids]
    cached = use_cache and bool(past_inputs(session))
    past, step = None, sequence
    for _ in range(new_tokens):
        past_length = len(sequence) - len(step) if cached else 0
        logits, present = run_step(session, np.asarray([step], np.int64), past, past_length)
        token = int(np.argmax(logits[0, -1]))
        sequence.append(token)
        past, step = (present, [token]) if cached else (None, sequence)
    return sequence[len(prompt_ids):]


def teacher_forced_agreement(session, prompt_ids: Sequence[int], reference_tokens: Sequence[int]) -> int:
    """At how many positions ``i`` the argmax of ``session`` on ``prompt + reference_tokens[:i]``
    is ``reference_tokens[i]`` (``reference_tokens``: another model's greedy continuation).

    Free-running generations of two models part at their first different token and never meet
    again, so exact match only says where the first disagreement falls; this scores every
    position on the same prefix, with one full forward pass.
    """
    ids = np.asarray([[*prompt_ids, *reference_tokens[:-1]]], np.int64)
    picks = run_step(session, ids)[0][0, len(prompt_ids) - 1:].argmax(-1)
    return int((picks == np.asarray(reference_tokens)).sum())


def compare_greedy(session, reference, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict:
    """How closely ``session`` (a converted model) generates what ``reference`` (its FP32 source)
    generates, greedily, ``new_tokens`` after each prompt.

    - ``identical``: prompts whose ``new_tokens`` tokens are all the reference's;
    - ``first_difference``: per prompt, the index of the first differing token (``new_tokens``
      when none differs);
    - ``teacher_forced``: positions, of ``len(prompts) * new_tokens``, where ``session`` picks the
      reference's token given the reference's own prefix (:func:`teacher_forced_agreement`);
    - ``reference_margins``: per prompt, the smallest gap between the reference's two largest
      logits along its own continuation. A quantized model keeps a token only where its logit
      error is below that gap, so a gap of 0.01 means a coin toss for any lossy model.
    """
    expected = [greedy_generate(reference, prompt, new_tokens) for prompt in prompts]
    first_difference, margins, agreeing = [], [], 0
    for prompt, tokens in zip(prompts, expected):
        generated = greedy_generate(session, prompt, new_tokens)
        first_difference.append(next((i for i, (a, b) in enumerate(zip(generated, tokens)) if a != b), new_tokens))
        agreeing += teacher_forced_agreement(session, prompt, tokens)
        logits = run_step(reference, np.asarray([[*prompt, *tokens[:-1]]], np.int64))[0][0, len(prompt) - 1:]
        margins.append(float(top2_gap(logits).min()))
    return {"identical": sum(d == new_tokens for d in first_difference), "prompts": len(prompts),
            "new_tokens": new_tokens, "first_difference": first_difference, "teacher_forced": agreeing,
            "reference_margins": margins}


def numpy_type(onnx_type: str) -> np.dtype:
    """``"tensor(int64)"`` -> ``np.int64`` (the types ORT reports for inputs)."""
    names = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16, "tensor(double)": np.float64}
    if onnx_type not in names:
        raise ValueError(f"unsupported input type {onnx_type}")
    return np.dtype(names[onnx_type])
