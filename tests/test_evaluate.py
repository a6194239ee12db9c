"""Perplexity / agreement metrics against independent torch computations.

The model here is a "bigram" ONNX graph, ``logits = Gather(table, input_ids)``: each position's
prediction depends on its own token only, so the expected numbers follow from the table with
torch alone, and ONNX Runtime returns the table's float32 values exactly.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

from fptq_onnx.errors import UserError
import torch

from fptq_onnx.evaluate import CONFIDENT_GAP, encode, evaluate, tokenizer_for
from fptq_onnx.models._tiny import BOS_ID, SPECIAL, WORDS, save_tiny_tokenizer, tiny_text

VOCAB = len(SPECIAL) + len(WORDS)
TEXT = tiny_text(61, seed=1)  # 61 known words -> 61 tokens


def _bigram_model(path, table: np.ndarray) -> None:
    """ONNX model ``logits[b, s, :] = table[input_ids[b, s]]`` with the usual two inputs."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "bigram",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
         onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "sequence", VOCAB])],
        [onnx.numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _table(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, (VOCAB, VOCAB)).astype(np.float32)


@pytest.fixture(params=[False, True], ids=["no BOS", "BOS"])
def bigram(request, tmp_path):
    """``(model_path, table, bos)``: a bigram model with its tokenizer beside it."""
    bos = request.param
    save_tiny_tokenizer(tmp_path, bos=bos)
    table = _table(0)
    _bigram_model(tmp_path / "model.onnx", table)
    return tmp_path / "model.onnx", table, bos


def _torch_windows(ids: list[int], window: int, bos: bool) -> list[list[int]]:
    """The window rule restated by hand: BOS + (window-1) tokens, or window tokens; full ones only."""
    lead, body = ([BOS_ID], window - 1) if bos else ([], window)
    return [lead + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]


def _torch_log_probs(table: np.ndarray, windows: list[list[int]]):
    """``(log_probs[T, V], targets[T])`` of all scored positions, float64, in torch."""
    t = torch.from_numpy(table).double()
    logp = torch.cat([torch.log_softmax(t[torch.tensor(w[:-1])], dim=-1) for w in windows])
    targets = torch.cat([torch.tensor(w[1:]) for w in windows])
    return logp, targets


def test_tokenizer_bos_detection(bigram):
    path, _, bos = bigram
    assert tokenizer_for(path).bos_id == (BOS_ID if bos else None)


def test_perplexity_matches_torch(bigram):
    path, table, bos = bigram
    ids = [SPECIAL.index(w) if w in SPECIAL else len(SPECIAL) + WORDS.index(w) for w in TEXT.split()]
    logp, targets = _torch_log_probs(table, _torch_windows(ids, 8, bos))
    nll = torch.nn.functional.nll_loss(logp, targets, reduction="mean").item()

    result = evaluate(path, TEXT, window=8, progress=False)

    assert result["tokens"] == (8 * 7 if bos else 7 * 7)  # 8 windows of BOS + 7, or 7 windows of 8
    assert result["perplexity"] == pytest.approx(np.exp(nll), rel=1e-12)
    assert set(result) == {"perplexity", "tokens"}


def test_reference_is_itself(bigram):
    path, _, _ = bigram
    result = evaluate(path, TEXT, reference_path=path, window=8, progress=False)
    assert result["top1_agreement"] == 1.0
    assert abs(result["kl"]) < 1e-12
    assert result["reference_perplexity"] == result["perplexity"]


def test_reference_metrics_match_torch(bigram, tmp_path):
    path, table, bos = bigram
    ref_table = table + _table(1) * 0.5
    _bigram_model(tmp_path / "reference.onnx", ref_table)
    ids = tokenizer_for(path).encode(TEXT)
    windows = _torch_windows(ids, 8, bos)
    logp, targets = _torch_log_probs(table, windows)
    ref_logp, _ = _torch_log_probs(ref_table, windows)

    result = evaluate(path, TEXT, reference_path=tmp_path / "reference.onnx", window=8, progress=False)

    kl = torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum").item() / len(targets)
    top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).double().mean().item()
    ref_nll = torch.nn.functional.nll_loss(ref_logp, targets).item()
    assert result["kl"] == pytest.approx(kl, rel=1e-9)
    assert result["kl"] > 0.1
    assert result["top1_agreement"] == pytest.approx(top1, abs=1e-12)
    assert result["reference_perplexity"] == pytest.approx(np.exp(ref_nll), rel=1e-12)
    top2 = ref_logp.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= CONFIDENT_GAP
    assert 0 < confident.sum() < len(targets)  # the bigram tables give both kinds of position
    assert result["confident_share"] == pytest.approx(confident.double().mean().item(), abs=1e-12)
    agree = logp.argmax(-1) == ref_logp.argmax(-1)
    assert result["confident_agreement"] == pytest.approx(agree[confident].double().mean().item(), abs=1e-12)


def test_windows_fed_to_the_session(bigram):
    """Through ``session_factory``: inputs are the windows, BOS first when the tokenizer adds one."""
    path, _, bos = bigram
    fed = []

    def recording_factory(model_path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

        class Recording:
            get_inputs, get_outputs = session.get_inputs, session.get_outputs

            def run(self, names, feeds):
                fed.append(feeds)
                return session.run(names, feeds)

        return Recording()

    evaluate(path, TEXT, window=8, max_tokens=20, session_factory=recording_factory, progress=False)

    ids = tokenizer_for(path).encode(TEXT)[:20]
    expected = _torch_windows(ids, 8, bos)
    assert [f["input_ids"].tolist() for f in fed] == [[w] for w in expected]
    assert all((f["attention_mask"] == 1).all() and f["attention_mask"].shape == f["input_ids"].shape for f in fed)


def test_encode_prefix_matches_full_encoding(tmp_path):
    tokenizer = tokenizer_for(save_tiny_tokenizer(tmp_path) / "model.onnx")
    text = tiny_text(3000, seed=2)
    full = encode(tokenizer, text)
    assert len(full) == 3000
    assert encode(tokenizer, text, max_tokens=100) == full[:100]
    assert encode(tokenizer, text, max_tokens=5000) == full


def test_error_no_tokenizer(tmp_path):
    _bigram_model(tmp_path / "model.onnx", _table(0))
    with pytest.raises(UserError, match="no tokenizer beside .*model.onnx; pass tokenizer_dir"):
        evaluate(tmp_path / "model.onnx", TEXT, progress=False)


def test_error_window_too_small(bigram):
    with pytest.raises(UserError, match="window must be at least 2 tokens, got 1"):
        evaluate(bigram[0], TEXT, window=1, progress=False)


def test_error_text_too_short(bigram):
    path, _, bos = bigram
    n = 6 if bos else 7  # one token short of a window (BOS + 7, or 8)
    with pytest.raises(UserError, match=f"the text has {n} tokens, fewer than one window of 8; pass a smaller window"):
        evaluate(path, tiny_text(n), window=8, progress=False)


def test_error_max_tokens_not_positive(bigram):
    with pytest.raises(UserError, match="max_tokens must be positive, got 0"):
        evaluate(bigram[0], TEXT, max_tokens=0, progress=False)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FPTQ_ONNX_SLOW") != "1", reason="real model: set FPTQ_ONNX_SLOW=1 (needs PyPI and npm, ~3 min)")
def test_smollm2_brown_perplexity(tmp_path):
    from fptq_onnx.data import brown_text
    from fptq_onnx.export import export_model

    path = export_model("smollm2-135m", tmp_path / "model.onnx", progress=False)
    result = evaluate(path, brown_text(progress=False), max_tokens=4096, progress=False)
    assert result["tokens"] == 4088
    assert result["perplexity"] == pytest.approx(38.07, abs=0.05)  # measured Nov 2026, see the report


def test_piqa_accuracy_matches_torch(bigram):
    """PIQA scoring on the bigram model: log-likelihoods of each continuation restated in torch,
    with sequences of different lengths batched 3 at a time (right padding must not matter)."""
    from fptq_onnx.data import PiqaItem, parse_piqa_record
    from fptq_onnx.evaluate import evaluate_piqa

    path, table, bos = bigram
    rng = np.random.default_rng(5)
    words = lambda n: " ".join(rng.choice(WORDS[:-4], n))  # noqa: E731
    items = [PiqaItem(words(3), (words(int(rng.integers(1, 6))), words(int(rng.integers(1, 6)))), int(rng.integers(2)))
             for _ in range(11)]
    tokenizer = tokenizer_for(path)
    t = torch.from_numpy(table).double()
    correct = correct_norm = 0
    for item in items:
        context = ([BOS_ID] if bos else []) + tokenizer.encode(f"Question: {item.goal}\nAnswer:")
        scores = []
        for solution in item.solutions:
            ids = context + tokenizer.encode(" " + solution)
            logp = torch.log_softmax(t[torch.tensor(ids[:-1])], dim=-1)
            ll = sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
            scores.append((ll, ll / len(" " + solution)))
        correct += int(np.argmax([s[0] for s in scores]) == item.label)
        correct_norm += int(np.argmax([s[1] for s in scores]) == item.label)
    result = evaluate_piqa(path, items, batch=3, progress=False)
    assert result == {"piqa_acc": correct / len(items), "piqa_acc_norm": correct_norm / len(items), "piqa_items": 11}
    record = {"question": "g ", "options": "A. first \nB. second", "answer": "A. first "}
    assert parse_piqa_record(record) == PiqaItem("g", ("first", "second"), 0)


def test_reference_logits_cache(bigram, tmp_path):
    """The second evaluation reads the reference's logits from the cache (no reference session)."""
    path, table, _ = bigram
    other = tmp_path / "other.onnx"
    _bigram_model(other, _table(3))
    cache = tmp_path / "ref.npy"
    first = evaluate(other, TEXT, reference_path=path, window=8, progress=False, reference_cache=cache)
    assert cache.exists() and not list(tmp_path.glob("*.tmp.npy"))

    def refuse(_):
        raise AssertionError("the reference must come from the cache")

    second = evaluate(other, TEXT, reference_path=path, window=8, progress=False, reference_cache=cache,
                      reference_session_factory=refuse)
    assert second == first and first["top1_agreement"] < 1.0
