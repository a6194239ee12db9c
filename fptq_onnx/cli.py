"""``fptq-onnx``: export, convert, inspect, eval, generate, chat, demo.

User mistakes (:class:`UserError`) end with one line on stderr and exit code 2; Ctrl-C with exit
code 130 and no output file left behind. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_config_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None, **defaults) -> None:
    """A flag for every field of ``CalibrationConfig`` and ``ConvertConfig`` (``config.option``): its
    help, type and choices from the field, its default shown from the dataclass (or ``defaults``,
    which also become the flag's value when it is not given; an absent flag leaves the field's
    default to the dataclass). ``only``: these fields alone."""
    from .config import ACCURACY_GROUP, CalibrationConfig, ConvertConfig, flag_of

    accuracy = parser.add_argument_group(ACCURACY_GROUP)
    for config in (CalibrationConfig(), ConvertConfig()):
        for field in dataclasses.fields(config):
            meta = field.metadata
            if not meta.get("help") or (only is not None and field.name not in only):
                continue
            default = defaults.get(field.name, getattr(config, field.name))
            shown = meta["shown"](config) if meta["shown"] else _shown(default)
            kwargs = dict(meta["argparse"])
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, (int, float)):
                kwargs.setdefault("type", type(default))
            text = meta["help"] + ("" if shown is None else f" (default {shown})")
            (accuracy if meta["accuracy"] else parser).add_argument(
                flag_of(field), dest=field.name, default=defaults.get(field.name, argparse.SUPPRESS),
                help=text.replace("%", "%%"), **kwargs)


def _shown(value) -> str | None:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return None if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def config_from_args(args: argparse.Namespace):
    """The ``ConvertConfig`` of the flags :func:`add_config_options` added and the user gave."""
    from .config import CalibrationConfig, ConvertConfig

    def given(config_class) -> dict:
        values = {}
        for field in dataclasses.fields(config_class):
            if field.metadata.get("help") and hasattr(args, field.name):
                value = getattr(args, field.name)
                values.update(field.metadata["to_fields"](value) if field.metadata["to_fields"] else {field.name: value})
        return values

    return ConvertConfig(calibration=CalibrationConfig(**given(CalibrationConfig)), **given(ConvertConfig))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fptq-onnx", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every pass decision; export and demo also show the warnings, log lines and progress "
                             "bars of the libraries they drive (torch.onnx, transformers, ...)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="Hugging Face model folder, GGUF file or recipe -> ONNX")
    export.add_argument("source", help="HF model folder, .gguf file, or recipe name (smollm2-135m, gemma3-270m)")
    export.add_argument("-o", "--output", required=True, type=Path,
                        help="an .onnx file, or a folder that gets model.onnx (the tokenizer, and the builder's "
                             "genai_config.json, go beside it)")
    export.add_argument("--exporter", choices=("auto", "builder", "torch"), default="auto",
                        help="builder: onnxruntime-genai's model builder (fused graph, KV cache, genai_config.json); "
                             "torch: fptq-onnx's torch exporter; auto: the builder, or torch where the builder "
                             "fails (default auto)")
    export.add_argument("--opset", type=int, default=18, help="torch exporter only (default 18)")
    export.add_argument("--with-past", action="store_true",
                        help="torch exporter: KV-cache layout, past_key_values.N.key/value in, present.N.key/value "
                             "out (optimum's); the builder's models always have a KV cache")

    convert = commands.add_parser("convert", help="calibrate and rewrite a model to W4A8 FPTQ")
    convert.add_argument("model", type=Path)
    convert.add_argument("--calib", required=True, type=Path,
                         help=".txt/.jsonl text, .npz of model inputs, or a folder of test_data_set_*")
    convert.add_argument("-o", "--output", required=True, type=Path)
    convert.add_argument("--dump-passes", metavar="DIR", type=Path,
                         help="write the graph after each pass as DIR/NN_<pass>.onnx (open in Netron)")
    convert.add_argument("--report", metavar="FILE", type=Path,
                         help="conversion report: FILE.html (self-contained) or FILE.md (+ PNGs beside it)")
    add_config_options(convert)

    inspect = commands.add_parser("inspect", help="summarize a model converted by fptq-onnx")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--layers", action="store_true", help="also list every W4A8 layer")

    evaluate = commands.add_parser("eval", help="perplexity (and agreement with a reference model) on text")
    evaluate.add_argument("model", type=Path, help=".onnx model, or an onnxruntime-genai folder (scored through "
                                                    "GenAI's own logits)")
    evaluate.add_argument("--text", required=True, type=Path)
    evaluate.add_argument("--reference", type=Path, help="FP32 model: adds top-1 agreement and KL")
    evaluate.add_argument("--max-tokens", type=int)
    evaluate.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    evaluate.add_argument("--tokenizer", type=Path)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    generate = commands.add_parser("generate", help="stream a continuation of a prompt with onnxruntime-genai")
    generate.add_argument("model", type=Path, help="onnxruntime-genai model folder (with genai_config.json)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat-template", action="store_true",
                          help="wrap the prompt as one user turn in the model's chat template")
    _add_search_options(generate)

    chat = commands.add_parser("chat", help="chat with an onnxruntime-genai model folder, one line of stdin a turn")
    chat.add_argument("model", type=Path, help="onnxruntime-genai model folder (with genai_config.json)")
    _add_search_options(chat)

    demo = commands.add_parser("demo", help="SmolLM2-135M: export, convert on SOTU, evaluate on Brown")
    demo.add_argument("--workdir", type=Path, help="where the models go (default: the cache folder)")
    demo.add_argument("--max-tokens", type=int, default=4096, help="Brown tokens to evaluate (default 4096)")
    add_config_options(demo, only=("samples",), samples=32)
    return parser


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    from .genai_run import SearchOptions

    defaults = SearchOptions()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"most tokens per answer (default {defaults.max_new_tokens})")
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: greedy)")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this probability "
                                                    "(default: greedy)")
    parser.add_argument("--seed", type=int, help="the sampler's random seed")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the model's session (default 0: the folder's setting)")


def _search_options(args):
    from .genai_run import SearchOptions

    return SearchOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)


def _run_generate(args) -> None:
    from .genai_run import load_model, run_generate

    options = _search_options(args)
    run_generate(load_model(args.model, args.threads), args.prompt, options, chat_template=args.chat_template)


def _run_chat(args) -> None:
    from .genai_run import load_model, run_chat

    options = _search_options(args)
    run_chat(load_model(args.model, args.threads), sys.stdin, options, interactive=sys.stdin.isatty())


def _run_export(args) -> None:
    from .export import export

    result = export(args.source, args.output, exporter=args.exporter, opset=args.opset, progress=not args.quiet,
                    with_past=args.with_past, verbose=args.verbose)
    print(result.summary)
    print(f"wrote {result.path}")


def _run_convert(args) -> None:
    from .pipeline import convert
    from .report import conversion_summary

    result = convert(args.model, args.output, args.calib, config_from_args(args), progress=not args.quiet,
                     dump_passes=args.dump_passes, report=args.report)
    print(conversion_summary(result))
    if result.dumps:
        print(f"pass dumps: {len(result.dumps)} files in {args.dump_passes} "
              f"({result.dumps[0].name} ... {result.dumps[-1].name})")
    if result.report is not None:
        print(f"report: {result.report}")


def _run_inspect(args) -> None:
    from .inspect_model import format_inspection, inspect_model

    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info, layers=args.layers))


def _run_eval(args) -> None:
    from .evaluate import evaluate
    from .session import InferenceSession

    if not args.text.is_file():
        raise UserError(f"text file {args.text} does not exist")
    text = args.text.read_text(encoding="utf-8", errors="replace")
    if args.model.is_dir() and (args.model / "genai_config.json").is_file():
        if args.reference is not None or args.tokenizer is not None:
            raise UserError("a GenAI folder is scored alone with its own tokenizer: --reference and --tokenizer "
                            "take .onnx models")
        from .evaluate import evaluate_genai

        result = evaluate_genai(args.model, text, max_tokens=args.max_tokens, window=args.window,
                                progress=not args.quiet)
    else:
        result = evaluate(args.model, text, tokenizer_dir=args.tokenizer, reference_path=args.reference,
                          max_tokens=args.max_tokens, window=args.window, session_factory=InferenceSession,
                          progress=not args.quiet)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>22s}: {value:.4f}" if isinstance(value, float) else f"{key:>22s}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    runners = {"export": _run_export, "convert": _run_convert, "inspect": _run_inspect, "eval": _run_eval,
               "generate": _run_generate, "chat": _run_chat}
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(workdir=args.workdir, max_tokens=args.max_tokens, samples=args.samples, progress=not args.quiet,
                     verbose=args.verbose)
        else:
            runners[args.command](args)
    except UserError as error:
        print(f"fptq-onnx {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"fptq-onnx {args.command}: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
