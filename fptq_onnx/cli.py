"""``fptq-onnx``: export, convert, inspect, eval, generate, chat, demo.

User mistakes (:class:`UserError`) end with one line on stderr and exit code 2; Ctrl-C with exit
code 130 and no output file left behind. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    from .calibration import CalibrationConfig
    from .pipeline import ConvertConfig

    defaults, calib = ConvertConfig(), CalibrationConfig()
    parser.add_argument("--samples", type=int, default=calib.samples,
                        help=f"calibration sequences cut from a text file (default {calib.samples})")
    parser.add_argument("--seq-len", type=int, default=calib.seq_len,
                        help=f"tokens per calibration sequence (default {calib.seq_len})")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: beside the model)")
    parser.add_argument("--v0", type=float, default=defaults.v0,
                        help=f"max|x| below which a layer uses per-tensor static int8 (default {defaults.v0:g})")
    parser.add_argument("--v1", type=float, default=defaults.v1,
                        help=f"max|x| above which a layer uses per-token dynamic int8 (default {defaults.v1:g})")
    parser.add_argument("--group-size", type=int, default=defaults.group_size,
                        help=f"weights per 4-bit group along K (default {defaults.group_size})")
    parser.add_argument("--symmetric", action="store_true", help="symmetric 4-bit weights (default asymmetric)")
    parser.add_argument("--nodes-to-exclude", metavar="REGEX", help="leave layers whose name matches in float")
    parser.add_argument("--lm-head", choices=("w8", "w4", "float"), default="w8",
                        help="the language-model head: 8-bit weights (default; a tied embedding then reads them), "
                             "4-bit, or left in float")
    parser.add_argument("--no-lae-fold", action="store_true",
                        help="always insert LAE's 1/s as a Mul node instead of folding it into the norm")
    parser.add_argument("--error-rows", type=int, default=calib.error_rows,
                        help="calibration rows sampled per layer input to measure each layer's output error "
                             f"(default {calib.error_rows}; 0: skip)")
    parser.add_argument("--calib-seq-lens", type=_int_list, metavar="L1,L2,...",
                        help="SLAC: calibration sequence lengths, cycled over the samples, to match the target "
                             "task's lengths (default: all --seq-len)")
    quality = parser.add_argument_group("accuracy options (defaults chosen by measurement, docs/accuracy.md)")
    quality.add_argument("--lae-bands", type=_band_list, default=defaults.lae_bands, metavar="BANDS",
                         help="bands whose layers get LAE scales: any of low,mid,high, or none "
                              f"(default {','.join(defaults.lae_bands) or 'none'}; the paper: mid)")
    quality.add_argument("--equalization", choices=("lae", "smoothquant"), default=defaults.equalization,
                         help=f"equalization scales (default {defaults.equalization})")
    quality.add_argument("--sq-alpha", type=float, default=defaults.sq_alpha,
                         help=f"SmoothQuant's alpha with --equalization smoothquant (default {defaults.sq_alpha})")
    quality.add_argument("--weight-clip", choices=("none", "output"), default=defaults.weight_clip,
                         help="per-group weight clipping searched to minimize the layer's output error "
                              f"(default {defaults.weight_clip})")
    quality.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=defaults.gptq,
                         help=f"GPTQ weight rounding with the calibration Hessian (default {'on' if defaults.gptq else 'off'})")
    quality.add_argument("--auto-thresholds", action=argparse.BooleanOptionalAction, default=defaults.auto_thresholds,
                         help="choose v0/v1 for this model by measured output error instead of --v0/--v1 "
                              f"(default {'on' if defaults.auto_thresholds else 'off'})")
    quality.add_argument("--w8-layers", type=_count_or_percent, default=(defaults.w8_layers, defaults.w8_fraction),
                         metavar="N|P%", help="mixed precision: keep the N layers with the largest output error "
                                              "(or those within P%% of the weights) at 8-bit weights; 0: all 4-bit "
                                              f"(default {defaults.w8_fraction * 100:.0f}%%)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _band_list(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(part.strip() for part in text.split(",") if part.strip())


def _count_or_percent(text: str) -> tuple[int, float]:
    try:
        return (0, float(text[:-1]) / 100) if text.endswith("%") else (int(text), 0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a percentage like 5%, got {text!r}") from None


def _convert_config(args: argparse.Namespace):
    from .calibration import CalibrationConfig
    from .pipeline import ConvertConfig

    return ConvertConfig(
        v0=args.v0, v1=args.v1, group_size=args.group_size, symmetric=args.symmetric,
        nodes_to_exclude=args.nodes_to_exclude, exclude_lm_head=args.lm_head == "float",
        lm_head_bits=8 if args.lm_head == "w8" else 4,
        fold_lae=not args.no_lae_fold, lae_bands=args.lae_bands, equalization=args.equalization,
        sq_alpha=args.sq_alpha, weight_clip=args.weight_clip, gptq=args.gptq, auto_thresholds=args.auto_thresholds,
        w8_layers=args.w8_layers[0], w8_fraction=args.w8_layers[1],
        calibration=CalibrationConfig(samples=args.samples, seq_len=args.seq_len, tokenizer=args.tokenizer,
                                      error_rows=args.error_rows, seq_lens=args.calib_seq_lens),
    )


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
    _add_convert_options(convert)

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
    demo.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
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

    result = convert(args.model, args.output, args.calib, _convert_config(args), progress=not args.quiet,
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


def conversion_summary(result) -> str:
    from collections import Counter

    from .passes.find_linears import NOT_A_LINEAR_LAYER

    counts = Counter((layer.band, layer.act_mode, layer.lae) for layer in result.layers)
    w8 = sum(layer.weight_bits == 8 for layer in result.layers)
    lines = [f"wrote {result.output}: {len(result.layers) - w8} layers to W4A8"
             + (f", {w8} kept at 8-bit weights (W8A8)" if w8 else "")
             + f", initializers {result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB"]
    config = result.config
    if config is not None:
        rounding = "GPTQ" if config.gptq else "round-to-nearest"
        clip = ", ranges clipped by output error" if config.weight_clip == "output" else ""
        lines.append(f"  weights: 4-bit {'symmetric' if config.symmetric else 'asymmetric'} g{config.group_size}, "
                     f"{rounding}{clip}")
    if result.thresholds is not None:
        lines.append(f"  thresholds chosen for this model: v0 = {result.thresholds[0]:.4g}, v1 = {result.thresholds[1]:.4g}")
    for (band, mode, lae), count in sorted(counts.items()):
        lines.append(f"  {count:4d} x band {band:4s} {mode}{' + LAE' if lae else ''}")
    skipped = [r for r in result.rejections if r.pass_name == "find_linears"]
    products = [r for r in skipped if r.reason == NOT_A_LINEAR_LAYER]
    if products:
        lines.append(f"  {len(products)} MatMul without a constant weight (attention products, weights fed at run time) left as they are")
    kept = [r for r in skipped if r.reason != NOT_A_LINEAR_LAYER]
    if kept:
        lines.append(f"  {len(kept)} linear layer(s) left in float: " +
                     "; ".join(f"{r.node} ({r.reason})" for r in kept[:3]) + (" ..." if len(kept) > 3 else ""))
    if result.genai_config is not None:
        lines.append(f"  onnxruntime-genai model folder: {result.genai_config.parent} "
                     f"({result.genai_config.name} loads our op library; og.Model('{result.genai_config.parent}'))")
    lines.append("  time: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in result.seconds.items() if sec >= 0.05))
    lines.extend(output_error_summary(result.layers))
    return "\n".join(lines)


def output_error_summary(layers, top: int = 10) -> list[str]:
    """The worst ``top`` layers by output error on calibration rows, and a count of the rest."""
    measured = sorted((layer for layer in layers if layer.output_error is not None),
                      key=lambda layer: layer.output_error, reverse=True)
    if not measured:
        return []
    lines = ["output error per layer on calibration rows, ||XW - Y_w4a8|| / ||XW||, worst first:"]
    width = max(len(layer.name) for layer in measured[:top])
    for layer in measured[:top]:
        scheme = layer.act_mode + (" + LAE" if layer.lae else "") + (" (8-bit weights)" if layer.weight_bits == 8 else "")
        lines.append(f"  {layer.output_error:8.4f}  {layer.name:{width}s}  v={layer.v:<8.4g} {layer.band:4s} {scheme}"
                     if layer.v is not None else f"  {layer.output_error:8.4f}  {layer.name:{width}s}  {scheme}")
    rest = measured[top:]
    if rest:
        errors = [layer.output_error for layer in rest]
        lines.append(f"  ... and {len(rest)} more layers, from {max(errors):.4f} down to {min(errors):.4f}")
    return lines


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
