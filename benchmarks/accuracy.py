"""Accuracy matrix: FPTQ W4A8 against the baselines a user would otherwise pick (not a test).

    python benchmarks/accuracy.py --models smollm2-135m gemma3-270m --tokens 8192

Rows (each a model file built once and cached, each result cached in --results, so the script
resumes where it stopped):

* ``fp32``            the exported model
* ``ort_w4a16_acc1``  ONNX Runtime's MatMulNBits quantizer, RTN asymmetric g128, accuracy_level 1
* ``ort_w4a8_acc4``   the same weights, accuracy_level 4 (ORT's int8-activation path)
* ``naive_w4a8``      ours, per-tensor static int8 in every layer, no LAE
* ``per_token_w4a8``  ours, per-token dynamic int8 in every layer
* ``fptq``            ours, the paper recipe (v0 15, v1 150, LAE), asymmetric weights (default)
* ``fptq_sym``        the same with symmetric weights

Calibration: State of the Union text only. Evaluation: Brown (and Moby Dick with --moby),
``--tokens`` tokens in 512-token windows; top-1 agreement and KL against FP32 with --agreement.
The lm_head stays in float in every row. Prints a markdown table for docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from fptq_onnx import data
from fptq_onnx.calibration import CalibrationConfig
from fptq_onnx.pipeline import ConvertConfig, convert
from fptq_onnx.session import InferenceSession

OURS = {
    "naive_w4a8": dict(v0=1e9, v1=1e9),
    "per_token_w4a8": dict(v0=1e-9, v1=1e-9),
    "fptq": dict(),
    "fptq_sym": dict(symmetric=True),
}
ORT_ROWS = {"ort_w4a16_acc1": 1, "ort_w4a8_acc4": 4}
ROWS = ["fp32", *ORT_ROWS, *OURS]


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


def build_row(row: str, fp32: Path, samples: int) -> tuple[Path, object]:
    if row == "fp32":
        return fp32, None
    if row in ORT_ROWS:
        return ort_quantized(fp32, ORT_ROWS[row]), None
    out = fp32.with_name(f"{row}.onnx")
    if not out.exists():
        config = ConvertConfig(calibration=CalibrationConfig(samples=samples, seq_len=512), **OURS[row])
        convert(fp32, out, data.text_path("sotu"), config)
    return out, InferenceSession


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 SOTU tokens")
    parser.add_argument("--agreement", action="store_true", help="also top-1 agreement and KL vs FP32")
    parser.add_argument("--moby", action="store_true", help="also Moby Dick perplexity")
    parser.add_argument("--root", type=Path, default=data.cache_dir() / "accuracy")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/accuracy.json"))
    args = parser.parse_args()
    from fptq_onnx.evaluate import default_session, evaluate

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    texts = {"brown": data.load_text("brown")}
    if args.moby:
        texts["moby_dick"] = data.load_text("moby_dick")
    for name in args.models:
        fp32 = fp32_model(name, args.root)
        for row in args.rows:
            for text_name, text in texts.items():
                key = f"{name}|{row}|{text_name}|{args.tokens}|{args.samples}"
                if key in results:
                    continue
                start = time.perf_counter()
                path, factory = build_row(row, fp32, args.samples)
                reference = fp32 if args.agreement and row != "fp32" else None
                result = evaluate(path, text, tokenizer_dir=fp32.parent, reference_path=reference,
                                  max_tokens=args.tokens, session_factory=factory or default_session,
                                  reference_session_factory=default_session)
                result["seconds"] = round(time.perf_counter() - start, 1)
                results[key] = result
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(results, indent=1, sort_keys=True))
                print(f"{key}: {result}", file=sys.stderr, flush=True)
    print(table(results, args))
    return 0


def table(results: dict, args) -> str:
    lines = [f"Brown perplexity, {args.tokens} tokens in 512-token windows; calibration {args.samples} x 512 SOTU "
             f"tokens; {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}", "",
             "| row | " + " | ".join(args.models) + " |", "|---|" + "---|" * len(args.models)]
    for row in args.rows:
        cells = []
        for name in args.models:
            result = results.get(f"{name}|{row}|brown|{args.tokens}|{args.samples}")
            if result is None:
                cells.append("-")
                continue
            cell = f"{result['perplexity']:.2f}"
            if "top1_agreement" in result:
                cell += f" (top-1 {result['top1_agreement'] * 100:.1f}%, KL {result['kl']:.3f})"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
