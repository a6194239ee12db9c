"""``fptq-onnx generate`` and ``fptq-onnx chat`` on a tiny GenAI model folder (the builder's fp32
model of a random LLaMA, built once in seconds).

What must hold: the streamed text is the decode of the tokens our own greedy loop
(``fptq_onnx.generate.greedy_generate`` on ONNX Runtime, no GenAI) generates, cut at
end-of-sequence; the stats line counts them; chat feeds each turn the history; bad input ends
with one line and exit code 2.
"""
from __future__ import annotations

import io
import json
import re
import sys

import onnxruntime as ort
import pytest

from fptq_onnx.generate import greedy_generate
from fptq_onnx.genai_run import SearchOptions, chat_prompt, load_model, plain_prompt, run_chat

from genai_fixtures import build_tiny_genai_model
from test_cli_errors import assert_one_line_error, run_cli

og = pytest.importorskip("onnxruntime_genai")

STATS = re.compile(r"^prompt (\d+) tokens, (\d+) new tokens, prefill [\d.]+ ms, decode [\d.]+ tokens/s$")
PROMPTS = ("the cat sat on", "a dog ran", "big log and far")
TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_genai_model(tmp_path_factory.mktemp("genai_run"))


@pytest.fixture(scope="module")
def reference(folder):
    """``expected(text, n) -> (prompt ids, decoded text)``: greedy by our own loop on ONNX Runtime,
    cut at end-of-sequence, decoded by the tokenizers library."""
    from tokenizers import Tokenizer

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]

    def expected(text: str, new_tokens: int) -> tuple[list[int], list[int], str]:
        ids = tokenizer.encode(text).ids
        tokens = greedy_generate(session, ids, new_tokens)
        tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
        return ids, tokens, tokenizer.decode(tokens)

    return expected


def stats_of(err: str) -> list[tuple[int, int]]:
    lines = err.strip().splitlines()
    assert all(STATS.match(line) for line in lines), err
    return [tuple(map(int, STATS.match(line).groups())) for line in lines]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_streams_our_greedy_tokens(folder, reference, capsys, prompt):
    model = folder / "model.onnx" if prompt == PROMPTS[0] else folder  # the file the config runs, or its folder
    code, out, err = run_cli(capsys, "generate", model, "--prompt", prompt, "--max-new-tokens", 12)
    assert code == 0, err
    ids, tokens, text = reference(prompt, 12)
    assert out == text + "\n"
    assert stats_of(err) == [(len(ids), len(tokens))]


def test_generations_are_long_enough_to_compare(reference):
    assert max(len(reference(prompt, 12)[1]) for prompt in PROMPTS) >= 8  # more than a token or two


def test_top_k_1_sampling_and_threads_give_greedy(folder, reference, capsys):
    code, out, err = run_cli(capsys, "generate", folder, "--prompt", PROMPTS[0], "--max-new-tokens", 12,
                             "--top-k", 1, "--temperature", 0.7, "--seed", 3, "--threads", 1)
    assert code == 0, err
    assert out == reference(PROMPTS[0], 12)[2] + "\n"


def test_sampling_with_a_seed_repeats(folder, capsys):
    argv = ("generate", folder, "--prompt", PROMPTS[1], "--max-new-tokens", 16, "--temperature", 1.5, "--seed", 11)
    first, second = run_cli(capsys, *argv), run_cli(capsys, *argv)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]


def test_generate_with_chat_template_of_a_model_without_one(folder, reference, capsys):
    code, out, err = run_cli(capsys, "generate", folder, "--prompt", "the cat", "--chat-template",
                             "--max-new-tokens", 6)
    assert code == 0, err
    assert plain_prompt([{"role": "user", "content": "the cat"}]) == "user: the cat\nassistant:"
    ids, tokens, text = reference("user: the cat\nassistant:", 6)
    assert out == text + "\n"
    assert stats_of(err) == [(len(ids), len(tokens))]


def test_chat_keeps_the_history(folder, reference, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n\nthe dog ran\n/exit\nnever read\n"))
    code, out, err = run_cli(capsys, "chat", folder, "--max-new-tokens", 8)
    assert code == 0, err
    first = reference("user: the cat\nassistant:", 8)
    second = reference(f"user: the cat\nassistant: {first[2].strip()}\nuser: the dog ran\nassistant:", 8)
    assert out == first[2] + "\n" + second[2] + "\n"
    assert stats_of(err) == [(len(first[0]), len(first[1])), (len(second[0]), len(second[1]))]


def _with_template(folder, tmp_path):
    """A copy of ``folder`` (files linked) whose tokenizer_config.json has :data:`TEMPLATE`."""
    copy = tmp_path / "templated"
    copy.mkdir()
    for item in folder.iterdir():
        if item.name != "tokenizer_config.json":
            (copy / item.name).symlink_to(item)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return copy


def test_chat_template_from_the_folder(folder, tmp_path):
    loaded = load_model(_with_template(folder, tmp_path))
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
                {"role": "user", "content": "a dog"}]
    expected = "<user> the cat\n<assistant> sat\n<user> a dog\n<assistant>"
    assert chat_prompt(loaded, messages) == expected

    class NoTemplateMethod:  # an onnxruntime-genai Tokenizer without apply_chat_template
        eos_token_ids = loaded.tokenizer.eos_token_ids

    loaded.tokenizer = NoTemplateMethod()
    assert chat_prompt(loaded, messages) == expected  # the jinja2 fallback renders the same


def test_run_chat_returns_the_conversation(folder):
    out, err = io.StringIO(), io.StringIO()
    messages = run_chat(load_model(folder), ["the cat\n", "/exit\n"], SearchOptions(max_new_tokens=4), out, err,
                        interactive=True)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == out.getvalue().strip()
    assert err.getvalue().startswith("> ") and err.getvalue().count("> ") == 2


def _no_model_file(folder, tmp_path):
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(folder / name)
    return tmp_path


def _truncated_tokenizer(folder, tmp_path):
    """tokenizer.json cut off halfway, as by an interrupted copy. (A word-level tokenizer, which
    onnxruntime-genai cannot read either, loaded in some runs and not others: 2026-12-03 CI.)"""
    for item in folder.iterdir():
        if item.name != "tokenizer.json":
            (tmp_path / item.name).symlink_to(item)
    text = (folder / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    return tmp_path


def _other_file(folder, tmp_path):
    for item in folder.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "other.onnx").symlink_to(folder / "model.onnx")
    return tmp_path / "other.onnx"


@pytest.mark.parametrize("make, message", [
    pytest.param(_other_file, "genai_config.json runs model.onnx, not other.onnx", id="a file the config does not run"),
    pytest.param(_no_model_file, "onnxruntime-genai cannot load", id="og load error"),
    pytest.param(_truncated_tokenizer, "onnxruntime-genai cannot load the tokenizer", id="og tokenizer error"),
])
def test_generate_errors(folder, tmp_path, capsys, make, message):
    """onnxruntime-genai's own load errors, one line each (the errors found before it loads
    anything are in tests/test_cli_errors.py::test_generate_and_chat_user_errors)."""
    code, out, err = run_cli(capsys, "generate", make(folder, tmp_path), "--prompt", "the cat")
    assert_one_line_error(code, err, message)
    assert out == ""


def test_prompt_longer_than_the_context(folder, capsys):
    code, out, err = run_cli(capsys, "generate", folder, "--prompt", "the cat " * 200)
    assert_one_line_error(code, err, "the model's context is 256")
