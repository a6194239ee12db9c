"""Run an onnxruntime-genai model folder: ``fptq-onnx generate`` and ``fptq-onnx chat``.

A folder is what ``onnxruntime_genai.Model(folder)`` loads: ``genai_config.json``, the model and
its tokenizer (``fptq-onnx export`` with the GenAI model builder writes one, and ``convert`` of
that model writes another with our op library named in the config). Tokens are streamed as they
come (``og.Tokenizer.create_stream``); after each answer one line on stderr gives

* ``prompt`` tokens and ``new`` tokens (a final end-of-sequence token is not counted);
* ``prefill``: the time of ``append_tokens(prompt)``, the prompt's own forward pass;
* ``decode``: new tokens per second of the token loop after it (the figure
  ``benchmarks/e2e_genai.py`` calls decode tok/s).

Search is greedy unless ``temperature``, ``top_k`` or ``top_p`` is given (then sampling, the
options not given taken from the folder's ``search`` section). ``threads`` sets the decoder
session's ``intra_op_num_threads`` through an in-memory overlay of the config (``og.Config``);
the folder is not touched.

``chat`` keeps the conversation and re-encodes all of it every turn through the model's chat
template: ``og.Tokenizer.apply_chat_template`` (it reads ``chat_template`` from
``tokenizer_config.json`` or ``chat_template.jinja``); with an onnxruntime-genai that lacks it,
the template from those files rendered with jinja2; a model without template gets plain turns,
``user: ...`` / ``assistant: ...`` lines ending in ``assistant:``.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

from .errors import UserError
from .genai import CONFIG_NAME, read_config
from .tokenizer import special_token, tokenizer_config

EXIT_COMMAND = "/exit"
NOT_A_FOLDER = "not an onnxruntime-genai model folder: convert writes one"


@dataclass(frozen=True)
class SearchOptions:
    """How the next tokens are chosen: greedy unless ``temperature``, ``top_k`` or ``top_p`` is set.

    ``max_new_tokens``: at most this many tokens after the prompt (fewer at end of sequence or at
    the model's context length); ``seed``: the sampler's random seed (None: onnxruntime-genai's).
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature is not None and not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def sampling(self) -> bool:
        return any(value is not None for value in (self.temperature, self.top_k, self.top_p))

    def search_options(self, prompt_tokens: int, context_length: int | None) -> dict:
        """Keyword arguments of ``og.GeneratorParams.set_search_options`` for this prompt."""
        max_length = prompt_tokens + self.max_new_tokens
        if context_length:
            if prompt_tokens >= context_length:
                raise UserError(f"the prompt has {prompt_tokens} tokens; the model's context is {context_length}")
            max_length = min(max_length, context_length)
        options = {"max_length": max_length, "do_sample": self.sampling}
        for name in ("temperature", "top_k", "top_p"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.seed is not None:
            options["random_seed"] = self.seed
        return options


@dataclass(frozen=True)
class GenerationStats:
    """One answer: token counts and seconds (see the module docstring)."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    def line(self) -> str:
        rate = self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        return (f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new tokens, "
                f"prefill {self.prefill_s * 1e3:.1f} ms, decode {rate:.1f} tokens/s")


@dataclass
class GenAIModel:
    """A loaded folder: the ``og.Model``, its ``og.Tokenizer`` and its ``genai_config.json``."""

    folder: Path
    model: object
    tokenizer: object
    config: dict

    @property
    def context_length(self) -> int | None:
        return self.config.get("model", {}).get("context_length")

    @property
    def eos_ids(self) -> set[int]:
        return {int(t) for t in self.tokenizer.eos_token_ids}


def import_genai():
    """The ``onnxruntime_genai`` module, or a UserError saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserError("onnxruntime-genai is not installed: pip install onnxruntime-genai") from None
    return onnxruntime_genai


def model_folder(path: str | Path) -> Path:
    """The GenAI folder ``path`` names (a folder, or the model file its ``genai_config.json``
    runs), checked to hold a ``genai_config.json``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model folder {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"{folder} is {NOT_A_FOLDER} (no {CONFIG_NAME})")
    if not path.is_dir():
        runs = (read_config(folder / CONFIG_NAME) or {}).get("model", {}).get("decoder", {}).get("filename")
        if runs != path.name:
            raise UserError(f"{folder / CONFIG_NAME} runs {runs}, not {path.name}: give the folder, or the file it names")
    return folder


def load_model(path: str | Path, threads: int = 0) -> GenAIModel:
    """Load the folder ``path`` with onnxruntime-genai; ``threads`` > 0 sets the decoder's
    ``intra_op_num_threads`` (in memory: the folder's config is not rewritten)."""
    if threads < 0:
        raise UserError(f"--threads must be 0 (the folder's setting) or more, got {threads}")
    folder = model_folder(path)
    config = read_config(folder / CONFIG_NAME)  # read_config takes a path inside the folder
    og = import_genai()
    try:
        og_config = og.Config(str(folder))
        if threads:
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(og_config)
    except RuntimeError as error:
        raise UserError(f"onnxruntime-genai cannot load {folder}: {_first_line(error)}") from None
    try:
        tokenizer = og.Tokenizer(model)
    except RuntimeError as error:
        raise UserError(f"onnxruntime-genai cannot load the tokenizer of {folder}: {_first_line(error)}") from None
    return GenAIModel(folder, model, tokenizer, config)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def generate(loaded: GenAIModel, prompt_ids, options: SearchOptions,
             write: Callable[[str], object] = lambda text: None) -> tuple[list[int], GenerationStats]:
    """Generate after ``prompt_ids``: ``(new token ids, stats)``, each token's text passed to
    ``write`` as soon as it is decoded (a final end-of-sequence token is neither written nor
    returned)."""
    og = import_genai()
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise UserError("the prompt is empty")
    params = og.GeneratorParams(loaded.model)
    params.set_search_options(**options.search_options(len(prompt_ids), loaded.context_length))
    generator = og.Generator(loaded.model, params)
    stream = loaded.tokenizer.create_stream()
    start = time.perf_counter()
    generator.append_tokens(prompt_ids)
    prefill = time.perf_counter() - start
    tokens, eos = [], loaded.eos_ids
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in eos and generator.is_done():
            break
        tokens.append(token)
        write(stream.decode(token))
    decode = time.perf_counter() - start
    return tokens, GenerationStats(len(prompt_ids), len(tokens), prefill, decode)


def chat_prompt(loaded: GenAIModel, messages: list[dict]) -> str:
    """The text of ``messages`` (``{"role", "content"}`` dicts) with the prompt for the next
    assistant turn, through the model's chat template (module docstring)."""
    tokenizer = loaded.tokenizer
    if hasattr(tokenizer, "apply_chat_template"):
        try:
            return tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except RuntimeError as error:
            if "empty chat template" not in str(error).lower():
                raise UserError(f"the chat template of {loaded.folder} failed: {_first_line(error)}") from None
        return plain_prompt(messages)  # onnxruntime-genai read the same files and found no template
    template = folder_chat_template(loaded.folder)
    if template is None:
        return plain_prompt(messages)
    import jinja2

    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    special = _special_tokens(loaded.folder)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **special)


def folder_chat_template(folder: Path) -> str | None:
    """``chat_template`` of ``tokenizer_config.json`` or the text of ``chat_template.jinja``."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) and template else None


def _special_tokens(folder: Path) -> dict:
    config = tokenizer_config(folder)
    return {f"{role}_token": token for role in ("bos", "eos") if (token := special_token(config, role)) is not None}


def plain_prompt(messages: list[dict]) -> str:
    """``role: content`` lines and ``assistant:``, for a model without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encode(loaded: GenAIModel, text: str) -> list[int]:
    return [int(t) for t in loaded.tokenizer.encode(text)]


def run_generate(loaded: GenAIModel, prompt: str, options: SearchOptions, chat_template: bool = False,
                 out: TextIO | None = None, err: TextIO | None = None) -> GenerationStats:
    """``fptq-onnx generate``: the continuation of ``prompt`` streamed to ``out``, stats to ``err``
    (default stdout and stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    text = chat_prompt(loaded, [{"role": "user", "content": prompt}]) if chat_template else prompt
    _, stats = generate(loaded, encode(loaded, text), options, _writer(out))
    out.write("\n")
    out.flush()
    print(stats.line(), file=err)
    return stats


def run_chat(loaded: GenAIModel, lines: Iterable[str], options: SearchOptions, out: TextIO | None = None,
             err: TextIO | None = None, interactive: bool = False) -> list[dict]:
    """``fptq-onnx chat``: one turn per line of ``lines`` until they end or one is ``/exit``;
    each answer streamed to ``out``, its stats to ``err`` (default stdout and stderr; with a
    ``> `` prompt there when ``interactive``). Returns the conversation."""
    out, err = out or sys.stdout, err or sys.stderr
    messages: list[dict] = []
    write = _writer(out)
    for line in _prompted(lines, err if interactive else None):
        if line.strip() == EXIT_COMMAND:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        pieces: list[str] = []
        _, stats = generate(loaded, encode(loaded, chat_prompt(loaded, messages)), options,
                            lambda text: (pieces.append(text), write(text)))
        out.write("\n")
        out.flush()
        print(stats.line(), file=err)
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})
    return messages


def _prompted(lines: Iterable[str], err: TextIO | None):
    """``lines``, with ``> `` written to ``err`` (when given) before each is read."""
    iterator = iter(lines)
    while True:
        if err is not None:
            err.write("> ")
            err.flush()
        line = next(iterator, None)
        if line is None:
            return
        yield line


def _writer(out: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write
