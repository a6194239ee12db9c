"""Accuracy matrix: FPTQ W4A8 against the baselines a user would otherwise pick (not a test).

    python benchmarks/accuracy.py --models smollm2-135m gemma3-270m --tokens 8192 \\
        --metrics brown moby_dick piqa

Rows (each a model file built once and cached under --root, each (model, row, metric) result
cached in --results, so the script resumes where it stopped): see ``ROWS``. Every W4A8 row is
ours (``fptq_onnx.convert``) except the two ONNX Runtime rows; every row keeps the lm_head in
float; ours run with our CPU kernel (``fptq_onnx.InferenceSession``).

Calibration: State of the Union text only, ``--samples`` windows of 512 tokens (SLAC rows draw
their own lengths). Metrics: perplexity on Brown and Moby Dick (``--tokens`` tokens each in
512-token windows), top-1 agreement and KL against FP32 on Brown, PIQA validation accuracy (1,500
items, acc_norm: length-normalized log-likelihood), and greedy generation against FP32 (16 new
tokens after each of ``fptq_onnx.generate.PROMPTS``: prompts generated identically, and
teacher-forced agreement). Prints a markdown table for docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cpu_gemm import cpu_model_name  # benchmarks/ is on sys.path when run as a script

from fptq_onnx import data
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.evaluate import CONFIDENT_GAP
from fptq_onnx.pipeline import calibrate, convert
from fptq_onnx.session import InferenceSession

ALL_BANDS = ("low", "mid", "high")
# every row starts from the paper recipe, whatever ConvertConfig's defaults become, and names
# what it changes: a row's numbers must not move when the defaults do
PAPER_RECIPE = dict(lae_bands=("mid",), weight_clip="none", gptq=False, auto_thresholds=False, w8_layers=0,
                    w8_fraction=0.0)
STATIC_EVERYWHERE = dict(v0=1e9, v1=1e9)
LAE_ALL_CLIP = dict(lae_bands=ALL_BANDS, weight_clip="output")
# row -> (description, ConvertConfig fields); CalibrationConfig fields go under "calibration"
OURS = {
    "naive_w4a8": ("naive W4A8: per-tensor static int8 everywhere, no equalization", STATIC_EVERYWHERE),
    "per_token_w4a8": ("W4A8 per-token dynamic everywhere", dict(v0=1e-9, v1=1e-9)),
    "smoothquant_a0.5": ("SmoothQuant alpha 0.5, per-tensor static everywhere",
                         dict(STATIC_EVERYWHERE, equalization="smoothquant", sq_alpha=0.5, lae_bands=ALL_BANDS)),
    "smoothquant_a0.75": ("SmoothQuant alpha 0.75, per-tensor static everywhere",
                          dict(STATIC_EVERYWHERE, equalization="smoothquant", sq_alpha=0.75, lae_bands=ALL_BANDS)),
    "fptq_paper": ("FPTQ paper recipe (v0 15, v1 150, LAE on the mid band, RTN weights)", {}),
    "fptq_sym": ("FPTQ paper recipe, symmetric weights", dict(symmetric=True)),
    "fptq_lae_all": ("+ LAE on every layer (bands kept for static/dynamic)", dict(lae_bands=ALL_BANDS)),
    "fptq_clip": ("+ weight clipping by output error", dict(weight_clip="output")),
    "fptq_gptq": ("+ GPTQ weight rounding", dict(gptq=True)),
    "fptq_auto_v": ("+ automatic v0/v1", dict(auto_thresholds=True)),
    "fptq_w8_10": ("+ mixed precision: 10 most sensitive layers at 8-bit weights", dict(w8_layers=10)),
    "fptq_slac_short": ("LAE on every layer + clipping + SLAC: calibration lengths 32, 64, 128 (PIQA-like)",
                        dict(LAE_ALL_CLIP, calibration=dict(seq_lens=(32, 64, 128)))),
    "fptq_lae_all_clip": ("LAE on every layer + clipping by output error (the defaults before mixed precision)",
                          LAE_ALL_CLIP),
    "fptq_lae_all_clip_auto_v": ("LAE on every layer + clipping by output error + automatic v0/v1",
                                 dict(LAE_ALL_CLIP, auto_thresholds=True)),
    "fptq_lae_all_clip_w8_10": ("LAE on every layer + clipping by output error + 10 layers at 8-bit weights",
                                dict(LAE_ALL_CLIP, w8_layers=10)),
    "fptq_lae_all_clip_w8_25pct": ("**FPTQ, our defaults**: LAE on every layer + clipping by output error + 25% of "
                                   "the weights at 8 bits", dict(LAE_ALL_CLIP, w8_fraction=0.25)),
    "w8a8_lae_all": ("bound of mixed precision: every layer W8A8 (LAE on every layer)",
                     dict(LAE_ALL_CLIP, w8_fraction=1.0)),
}
ORT_ROWS = {"ort_w4a16_acc1": ("ONNX Runtime MatMulNBits W4A16 RTN asym g128, accuracy_level 1", 1),
            "ort_w4a8_acc4": ("ONNX Runtime MatMulNBits accuracy_level 4 (its int8-activation path)", 4)}
ROWS = ["fp32", *ORT_ROWS, *OURS]
METRICS = ("brown", "moby_dick", "piqa", "greedy")
# the size of the fixed-size metrics, in place of --tokens in a result's key
FIXED_SIZE = {"piqa": 1500, "greedy": 16}


def fp32_model(name: str, root: Path) -> Path:
    from fptq_onnx.export import export_model
    from fptq_onnx.models import prepare

    path = root / name / "fp32.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(prepare(name), path)
    return path


def ort_quantized(fp32: Path, accuracy_level: int) -> Path:
    """ONNX Runtime's own W4 quantizer (RTN, asymmetric, block 128), lm_head kept in float."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out = fp32.with_name(f"ort_acc{accuracy_level}.onnx")
    if out.exists():
        return out
    model = onnx.load(str(fp32))
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0] in {o.name for o in model.graph.output}]
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    return out


def row_config(row: str, samples: int) -> ConvertConfig:
    fields = {**PAPER_RECIPE, **OURS[row][1]}
    calibration = dict(samples=samples, seq_len=512, **fields.pop("calibration", {}))
    return ConvertConfig(calibration=CalibrationConfig(**calibration), **fields)


def build_row(row: str, fp32: Path, samples: int, stats_cache: dict) -> tuple[Path, object]:
    if row == "fp32":
        return fp32, None
    if row in ORT_ROWS:
        return ort_quantized(fp32, ORT_ROWS[row][1]), None
    out = fp32.with_name(f"{row}.onnx")
    if not out.exists():
        config = row_config(row, samples)
        convert(fp32, out, data.text_path("sotu"), config, stats=row_stats(fp32, config, stats_cache))
    return out, InferenceSession


def row_stats(fp32: Path, config: ConvertConfig, cache: dict):
    """The calibration statistics of ``config``, shared by the rows of one model: one run per
    calibration setting and Hessian kind, and any run of the setting serves a row needing no
    Hessian. One run is kept at a time: with a Hessian they can be large."""
    key = (config.calibration, config.hessian_kind, config.group_size)
    if key not in cache and config.hessian_kind == "none":
        key = next((kept for kept in cache if kept[0] == config.calibration), key)
    if key not in cache:
        cache.clear()
        cache[key] = calibrate(fp32, data.text_path("sotu"), config)
    return cache[key]


def measure(metric: str, path: Path, factory, fp32: Path, tokens: int) -> dict:
    from fptq_onnx.evaluate import default_session, evaluate, evaluate_piqa

    factory = factory or default_session
    if metric == "piqa":
        return evaluate_piqa(path, data.piqa_items(), tokenizer_dir=fp32.parent, session_factory=factory)
    if metric == "greedy":
        from fptq_onnx.generate import PROMPTS, compare_greedy
        from fptq_onnx.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(fp32.parent)
        return compare_greedy(factory(path), default_session(fp32), [tokenizer.prompt(p) for p in PROMPTS],
                              FIXED_SIZE["greedy"])
    reference = fp32 if path != fp32 and metric == "brown" else None  # agreement on Brown only: it doubles the cost
    return evaluate(path, data.load_text(metric), tokenizer_dir=fp32.parent, reference_path=reference,
                    max_tokens=tokens, session_factory=factory, reference_session_factory=default_session,
                    reference_cache=fp32.with_name(f"fp32_logits_{metric}_{tokens}.npy"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of SOTU")
    parser.add_argument("--root", type=Path, default=data.cache_dir() / "accuracy")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/accuracy.json"))
    parser.add_argument("--rebuild", nargs="*", default=[], help="rows whose cached model files to rebuild")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the selected rows and metrics again (their model files are kept)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for name in [] if args.table_only else args.models:
        fp32 = fp32_model(name, args.root)
        stats_cache: dict = {}  # calibration statistics shared by the rows of one model
        for row in args.rows:
            if row in args.rebuild:
                for stale in fp32.parent.glob(f"{row}.onnx*"):
                    stale.unlink()
                for key in [k for k in results if k.startswith(f"{name}|{row}|")]:
                    del results[key]
            for metric in args.metrics:
                key = result_key(name, row, metric, args)
                if key in results and not args.remeasure:
                    continue
                start = time.perf_counter()
                path, factory = build_row(row, fp32, args.samples, stats_cache)
                result = measure(metric, path, factory, fp32, args.tokens)
                result["seconds"] = round(time.perf_counter() - start, 1)
                result["date"] = time.strftime("%Y-%m-%d")
                results[key] = result
                save_result(args.results, key, result)
                print(f"{key}: {result}", file=sys.stderr, flush=True)
    print(table(results, args))
    return 0


def save_result(path: Path, key: str, result: dict) -> None:
    """Add one result to the JSON file, re-reading it first: several runs may share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[key] = result
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
    tmp.replace(path)


def agreement(brown: dict) -> str:
    """``top-1 / KL (top-1 where FP32's top-2 gap >= CONFIDENT_GAP)``; the last part for results
    measured since it exists."""
    confident = brown.get("confident_agreement")
    return (f"{brown['top1_agreement'] * 100:.1f}% / {brown['kl']:.3f}"
            + (f" ({confident * 100:.1f}%)" if confident is not None else ""))


def result_key(model: str, row: str, metric: str, args) -> str:
    return f"{model}|{row}|{metric}|{FIXED_SIZE.get(metric, args.tokens)}|{args.samples}"


def describe(row: str) -> str:
    if row == "fp32":
        return "FP32"
    return ORT_ROWS[row][0] if row in ORT_ROWS else OURS[row][0]


def table(results: dict, args) -> str:
    lines = [f"{args.tokens} tokens per text in 512-token windows; PIQA 1,500 validation items (acc_norm); "
             f"calibration {args.samples} x 512 SOTU tokens; {cpu_model_name()}. FP32 is confident where its top two "
             f"log-probabilities differ by >= {CONFIDENT_GAP:g} nats (``fptq_onnx.evaluate.CONFIDENT_GAP``).", ""]
    for name in args.models:
        lines += [f"**{name}**", "",
                  "| row | Brown ppl | Moby Dick ppl | Brown top-1 / KL vs FP32 (top-1 where FP32 is confident) "
                  "| PIQA acc_norm (acc) | greedy vs FP32: identical / teacher-forced |",
                  "|---|---|---|---|---|---|"]
        for row in args.rows:
            get = lambda metric: results.get(result_key(name, row, metric, args))  # noqa: E731
            brown, moby, piqa, greedy = get("brown"), get("moby_dick"), get("piqa"), get("greedy")
            cells = [f"{brown['perplexity']:.2f}" if brown else "-", f"{moby['perplexity']:.2f}" if moby else "-",
                     agreement(brown) if brown and "kl" in brown else "-",
                     f"{piqa['piqa_acc_norm'] * 100:.1f} ({piqa['piqa_acc'] * 100:.1f})" if piqa else "-",
                     f"{greedy['identical']}/{greedy['prompts']} / "
                     f"{greedy['teacher_forced']}/{greedy['prompts'] * greedy['new_tokens']}" if greedy else "-"]
            lines.append(f"| `{row}` {describe(row)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
