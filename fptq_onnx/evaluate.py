"""Perplexity of an ONNX language model, and its agreement with a reference model.

Windows. The text is tokenized once without special tokens (``fptq_onnx.tokenizer``, the same
tokenizer and window rule calibration uses) and cut after ``max_tokens`` tokens. It is split into
non-overlapping windows, each one model input of ``window`` tokens, evaluated independently (no
context carried over); a last partial window is dropped.

* If the tokenizer adds a BOS token (as Gemma-3's does), each window is ``[BOS] + window - 1``
  text tokens and every text token is predicted.
* Otherwise (SmolLM2) each window is ``window`` text tokens and the first one is context only.

Either way the scored positions are ``t = 1 .. L-1`` of each input ``x[0 .. L-1]``, predicting
``x[t]`` from ``x[:t]``; the BOS itself is never a target. With ``N`` scored tokens::

    nll_t        = -log p(x_t | x_<t)                      (log-softmax in float64)
    perplexity   = exp(sum_t nll_t / N)
    top1         = #{t : argmax p(. | x_<t) == argmax q(. | x_<t)} / N      (q: reference)
    kl           = sum_t sum_v q_v (log q_v - log p_v) / N                   (KL(ref || model))
    confident    = {t : log q_(1) - log q_(2) >= CONFIDENT_GAP}    (the reference's top-2 gap, nats)
    confident_agreement = #{t in confident : argmax p == argmax q} / #confident

A quantized model's logits carry an error; where the reference's top two logits lie closer than
that error, its top-1 is a coin toss for *any* lossy model (SmolLM2's FP32 gap is below 0.02 nats
at some step of 3 of the 5 generation prompts). ``confident_agreement`` scores only the positions
where the reference has decided, so a real conversion fault shows there, not noise.

Example: 10 text tokens, window 4, no BOS -> inputs [0:4] [4:8], 3 + 3 = 6 targets;
with a BOS -> inputs [B 0 1 2] [B 3 4 5] [B 6 7 8], 9 targets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .genai import read_config
from .generate import empty_past, numpy_type, top2_gap
from .progress import progress_bar
from .tokenizer import TextTokenizer, find_tokenizer, load_tokenizer

_ROW_CHUNK = 128  # rows of logits turned into float64 at once: bounds memory for 262k vocabularies
CONFIDENT_GAP = 2.0  # nats between the reference's top two log-probabilities (odds e^2 ~ 7.4 : 1)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def tokenizer_for(model_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer in ``tokenizer_dir``, or the one saved beside ``model_path``."""
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else find_tokenizer(model_path)
    if folder is None:
        raise UserError(f"no tokenizer beside {model_path}; pass tokenizer_dir")
    return load_tokenizer(folder)


def encode(tokenizer: TextTokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, the first ``max_tokens`` of them.

    With ``max_tokens`` only a prefix of the text is tokenized (Brown is 1.5 M tokens), grown
    until it yields a margin of extra tokens: a cut inside a word changes only the last few
    tokens, which are dropped.
    """
    if max_tokens is None:
        return tokenizer.encode(text)
    if max_tokens < 1:
        raise UserError(f"max_tokens must be positive, got {max_tokens}")
    margin = 64
    chars = 8 * (max_tokens + margin)
    while True:
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text) or len(ids) >= max_tokens + margin:
            return ids[:max_tokens]
        chars *= 2


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log p = x - max(x) - log(sum(exp(x - max(x))))`` over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Totals:
    """Running sums over scored positions (plain sums in float64; divided once at the end)."""

    def __init__(self):
        self.tokens = 0
        self.nll = 0.0
        self.ref_nll = 0.0
        self.agree = 0
        self.kl = 0.0
        self.confident = 0
        self.confident_agree = 0

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None) -> None:
        """``logits[T, V]`` predicting ``targets[T]``; ``ref_logits[T, V]`` from the reference."""
        rows = np.arange(len(targets))
        for lo in range(0, len(targets), _ROW_CHUNK):
            part = slice(lo, lo + _ROW_CHUNK)
            logp = log_softmax(logits[part])
            self.nll -= logp[rows[part] - lo, targets[part]].sum()
            if ref_logits is not None:
                ref_logp = log_softmax(ref_logits[part])
                self.ref_nll -= ref_logp[rows[part] - lo, targets[part]].sum()
                agree = logp.argmax(-1) == ref_logp.argmax(-1)
                confident = top2_gap(ref_logp) >= CONFIDENT_GAP
                self.agree += int(agree.sum())
                self.confident += int(confident.sum())
                self.confident_agree += int((agree & confident).sum())
                self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
        self.tokens += len(targets)

    def result(self, with_reference: bool) -> dict:
        out = {"perplexity": float(np.exp(self.nll / self.tokens)), "tokens": self.tokens}
        if with_reference:
            out.update(reference_perplexity=float(np.exp(self.ref_nll / self.tokens)),
                       top1_agreement=self.agree / self.tokens, kl=self.kl / self.tokens,
                       confident_share=self.confident / self.tokens,
                       confident_agreement=self.confident_agree / self.confident if self.confident else None)
        return out


def default_session(path: str | os.PathLike):
    """A plain ONNX Runtime CPU session."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch_logits(session, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``logits[B, L, V]`` of ``ids[B, L]`` with ``attention_mask = mask[B, L]``; feeds only the
    inputs the graph declares: ``position_ids`` counted over the unmasked tokens, and a KV
    cache (the GenAI builder's, ``--with-past``) empty."""
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0), **empty_past(session, len(ids))}
    declared = {i.name: i for i in session.get_inputs()}
    missing = [n for n in declared if n not in feeds]
    if missing:
        raise UserError(f"model inputs {missing} are not input_ids/attention_mask/position_ids/a KV cache")
    names = list(declared)
    feeds = {n: np.asarray(feeds[n]).astype(numpy_type(declared[n].type), copy=False) for n in names}
    outputs = [o.name for o in session.get_outputs()]
    name = "logits" if "logits" in outputs else outputs[0]
    return session.run([name], {n: feeds[n] for n in names})[0]


def _logits(session, ids: np.ndarray) -> np.ndarray:
    """``logits[L, V]`` of one input ``ids[L]``."""
    return _batch_logits(session, ids[None, :], np.ones((1, len(ids)), dtype=np.int64))[0]


def evaluate(model_path: str | os.PathLike, text: str, tokenizer_dir: str | os.PathLike | None = None,
             reference_path: str | os.PathLike | None = None, max_tokens: int | None = None,
             window: int = 512, session_factory: Callable | None = None, progress: bool = True,
             reference_session_factory: Callable | None = None,
             reference_cache: str | os.PathLike | None = None) -> dict:
    """Perplexity of ``model_path`` on ``text``; with ``reference_path`` also agreement with it.

    Args:
        model_path: exported ``.onnx`` model (inputs ``input_ids``, ``attention_mask``).
        text: plain text, e.g. ``fptq_onnx.data.brown_text()``.
        tokenizer_dir: tokenizer folder; default: ``fptq_onnx.tokenizer.find_tokenizer``.
        reference_path: a second ``.onnx`` model (typically the fp32 export), same tokenizer.
        max_tokens: use only the first ``max_tokens`` text tokens.
        window: tokens per model input (BOS included).
        session_factory: ``path -> onnxruntime.InferenceSession``, e.g. one that registers the
            fptq op library; default :func:`default_session`.
        progress: show a progress bar.
        reference_session_factory: the same for the reference (default: ``session_factory``);
            e.g. stock ONNX Runtime for the reference and our library for the model.
        reference_cache: a ``.npy`` file holding the reference's float32 logits of these windows
            (written on first use, memory-mapped after): benchmarks comparing many models against
            one reference run it once. The caller keys it by reference, text, tokens and window.

    Returns:
        ``{"perplexity", "tokens"}`` (tokens = scored predictions), plus ``"reference_perplexity",
        "top1_agreement", "kl"`` (mean nats per token), ``"confident_share"`` (of the scored
        positions, those where the reference's top-2 gap is >= ``CONFIDENT_GAP``) and
        ``"confident_agreement"`` (top-1 agreement on them; None if none) with a reference.
    """
    _check_window(window)
    tokenizer = tokenizer_for(model_path, tokenizer_dir)
    ids = encode(tokenizer, text, max_tokens)
    windows = tokenizer.windows(ids, window)
    if not windows:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {window}; pass a smaller window")
    factory = session_factory or default_session
    session = factory(model_path)
    reference_factory = reference_session_factory or factory
    cached = _reference_logits_cache(reference_cache, len(windows), window) if reference_path is not None else None
    writing = reference_path is not None and reference_cache is not None and cached is None
    reference = reference_factory(reference_path) if reference_path is not None and cached is None else None
    totals = _Totals()
    for index, x in enumerate(progress_bar([np.asarray(w, dtype=np.int64) for w in windows], desc="evaluating",
                                           unit="window", enabled=progress)):
        # logits at position t predict x[t + 1]; the last position predicts nothing here.
        ref_logits = cached[index] if cached is not None else None
        if reference is not None:
            ref_logits = _logits(reference, x)[:-1]
            if writing:
                cached = _store_reference(cached, index, ref_logits, reference_cache, len(windows))
        totals.add(_logits(session, x)[:-1], x[1:], ref_logits)
    if writing:
        cached.flush()
        os.replace(cached.filename, reference_cache)  # complete: later runs read it
    return totals.result(reference_path is not None)


def _reference_logits_cache(path, count: int, window: int):
    """The cached reference logits ``[count, window - 1, V]`` (mode ``"r"``), or None to start one."""
    if path is None:
        return None
    path = Path(path)
    if path.exists():
        cached = np.load(path, mmap_mode="r")
        if cached.shape[:2] == (count, window - 1):
            return cached
    return None


def _store_reference(cached, index: int, logits: np.ndarray, path, count: int):
    """Write one window's reference logits into a temporary ``.npy`` beside ``path``."""
    if cached is None:
        tmp = Path(path).with_name(Path(path).name + f".{os.getpid()}.tmp.npy")
        cached = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count,) + logits.shape)
    cached[index] = logits
    return cached


# ---------------------------------------------------------------------------------------------
# PIQA
# ---------------------------------------------------------------------------------------------


def piqa_sequences(tokenizer: TextTokenizer, items) -> list[tuple[list[int], int]]:
    """Two scored sequences per item, in order: ``(ids, first scored position)``.

    The prompt is lm-evaluation-harness's ``"Question: {goal}\\nAnswer:"`` and each candidate the
    continuation ``" {solution}"``, tokenized apart (so the continuation's tokens do not depend on
    the prompt) and led by BOS when the model expects one.
    """
    sequences = []
    for item in items:
        context = tokenizer.prompt(f"Question: {item.goal}\nAnswer:")
        for solution in item.solutions:
            sequences.append((context + tokenizer.encode(" " + solution), len(context)))
    return sequences


def evaluate_piqa(model_path: str | os.PathLike, items, tokenizer_dir: str | os.PathLike | None = None,
                  session_factory: Callable | None = None, batch: int = 16, progress: bool = True) -> dict:
    """PIQA accuracy of ``model_path``: the candidate solution the model finds more likely wins.

    For a continuation ``c`` of ``n`` tokens and ``len(c)`` characters after the prompt ``x``::

        ll(c)      = sum_{t in c} log p(c_t | x, c_<t)
        acc        = mean over items of [argmax_c ll(c) == label]
        acc_norm   = mean over items of [argmax_c ll(c) / len(c) == label]   (length-normalized)

    ``acc_norm`` (by characters, as lm-evaluation-harness does) is the headline number. Sequences
    are batched ``batch`` at a time, right-padded: with causal attention the padding after a
    sequence cannot change its logits, and the mask hides it too.

    Returns ``{"piqa_acc", "piqa_acc_norm", "piqa_items"}``.
    """
    tokenizer = tokenizer_for(model_path, tokenizer_dir)
    items = list(items)
    sequences = piqa_sequences(tokenizer, items)
    session = (session_factory or default_session)(model_path)
    loglik = np.zeros(len(sequences))
    order = np.argsort([len(ids) for ids, _ in sequences], kind="stable")  # similar lengths batch together
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    for chosen in progress_bar(batches, desc="PIQA", unit="batch", enabled=progress):
        width = max(len(sequences[i][0]) for i in chosen)
        ids = np.zeros((len(chosen), width), np.int64)
        mask = np.zeros((len(chosen), width), np.int64)
        for row, i in enumerate(chosen):
            ids[row, :len(sequences[i][0])] = sequences[i][0]
            mask[row, :len(sequences[i][0])] = 1
        logits = _batch_logits(session, ids, mask)
        for row, i in enumerate(chosen):
            seq, start = sequences[i]
            targets = np.asarray(seq[start:])
            logp = log_softmax(logits[row, start - 1:len(seq) - 1])  # position t-1 predicts token t
            loglik[i] = logp[np.arange(len(targets)), targets].sum()
    pairs = loglik.reshape(len(items), 2)
    chars = np.array([[len(" " + s) for s in item.solutions] for item in items], dtype=np.float64)
    labels = np.array([item.label for item in items])
    return {"piqa_acc": float((pairs.argmax(1) == labels).mean()),
            "piqa_acc_norm": float(((pairs / chars).argmax(1) == labels).mean()),
            "piqa_items": len(items)}


def _check_window(window: int) -> None:
    if window < 2:
        raise UserError(f"window must be at least 2 tokens, got {window}")


def evaluate_genai(folder: str | os.PathLike, text: str, max_tokens: int | None = None, window: int = 512,
                   progress: bool = True) -> dict:
    """Perplexity of an onnxruntime-genai model folder on ``text``, from GenAI's own logits.

    The same windows and scores as :func:`evaluate` (module docstring), so the two agree on a model
    both can run; here each window is one ``Generator.append_tokens`` of a fresh generator (an
    empty cache), whose ``get_output("logits")`` holds every position's logits. What is measured
    is then the model as GenAI runs it: its graph, its cache handling, its session options (our
    op library where the folder's config loads it).
    """
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("evaluating a GenAI folder needs onnxruntime-genai: pip install onnxruntime-genai") from None
    _check_window(window)
    folder = Path(folder)
    context = (read_config(folder / "genai_config.json") or {}).get("model", {}).get("context_length")
    if context and window > context:
        raise UserError(f"a window of {window} tokens exceeds the model's context length {context}: pass a smaller window")
    tokenizer = load_tokenizer(folder)
    windows = tokenizer.windows(encode(tokenizer, text, max_tokens), window)
    if not windows:
        raise UserError(f"the text has fewer tokens than one window of {window}; pass a smaller window")
    model = og.Model(str(folder))
    totals = _Totals()
    for x in progress_bar([np.asarray(w, dtype=np.int64) for w in windows], desc="evaluating", unit="window",
                          enabled=progress):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(x), do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(x.astype(np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(len(x), -1)
        totals.add(logits[:-1], x[1:], None)
        del generator
    return totals.result(False)
