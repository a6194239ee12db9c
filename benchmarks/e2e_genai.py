#!/usr/bin/env python3
"""Decode and prefill speed of GenAI model folders, side by side in one process.

Each folder is what ``onnxruntime_genai.Model(folder)`` loads (the GenAI model builder's output,
or a converted model with a ``genai_config.json`` whose session options load libfptq_ops.so).
Per folder, batch 1, greedy:

* ``decode``: tokens/s over ``--new-tokens`` (128) generated after a ``--prompt-tokens`` (25)
  token prompt of real text (Brown), the prompt's own pass excluded;
* ``prefill``: ms for one ``append_tokens`` of ``--prefill`` (512) tokens.

Rounds are interleaved (noise from other processes hits every model alike); the median is
printed. ``--threads`` sets ``intra_op_num_threads`` of every session (0: the folder's own), in
memory (``fptq_onnx.genai_run.load_model``).

    python benchmarks/e2e_genai.py builder-fp32/ builder-int4/ ours-w4a8/ --threads 2

With ``--build RECIPE --workdir DIR`` (smollm2-135m, gemma3-270m) it first makes the rows of
issue 12's table in DIR, each once (a folder that exists is reused):

* ``builder-fp32``, ``builder-int4`` (its defaults: block 32, symmetric, accuracy_level 4,
  int4 lm_head) and ``builder-int4-b128`` (``--extra_options block_size=128``), by
  ``onnxruntime_genai.models.builder`` from the recipe's HF folder;
* ``fptq-w4a8`` (``fptq-onnx convert`` defaults) and ``fptq-w4a8-w8-0`` (``--w8-layers 0``),
  converted from the fp32 row with SOTU calibration text (``--samples``).

Where the builder cannot build the model (Gemma-3-270m: ``KeyError: 'rope_type'``), the fp32
row is ``fptq-onnx export --exporter torch --with-past`` (our KV-cache export, to which
``convert`` gives a GenAI config) and the int4 rows are ONNX Runtime's MatMulNBits quantizer
(``ort-int4-b32``, ``ort-int4-b128``: symmetric, accuracy_level 4) on that same fp32 model;
``ort-int4-b128-fused`` quantizes it after our RMSNorm and GELU fusions (which ``convert`` runs
on our rows), to tell the fusions' share of the difference from the rest.

``--ppl`` adds Brown perplexity through GenAI's own logits (``fptq_onnx.evaluate.evaluate_genai``,
3,072 tokens in 512-token windows). ``--threads 1,2`` measures each thread count in turn. Every
model runs one 512-token prefill before the timing (weights repacked, buffers allocated).
``--profile`` instead prints, per folder, ONNX Runtime's time per op type of one ``--prefill``
and one 1-token step after an empty cache (its profiler on the folder's model.onnx, with the
library its genai_config names): where the time of the two goes.
Caveat: the reachable models started as GGUF on a 32-block 4-bit grid, which favours the
block-32 rows (docs/accuracy.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUILDER_ROWS = {"builder-fp32": ["-p", "fp32"], "builder-int4": ["-p", "int4"],
                "builder-int4-b128": ["-p", "int4", "--extra_options", "block_size=128"]}
OURS_ROWS = {"fptq-w4a8": [], "fptq-w4a8-w8-0": ["--w8-layers", "0"]}
# (block, fused): "fused" first runs our RMSNorm and GELU fusions on the fp32 graph (convert runs
# them on ours), to show how much of the gap is those fusions
ORT_ROWS = {"ort-int4-b32": (32, False), "ort-int4-b128": (128, False), "ort-int4-b128-fused": (128, True)}


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:  # this benchmark runs on Linux (GenAI's CPU wheels)
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")


def decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):
        generator.generate_next_token()
    return new_tokens / (time.perf_counter() - start)


def prefill_ms(model, ids: list[int]) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    return (time.perf_counter() - start) * 1e3


def run(command: list[str]) -> None:
    """Run a build step; on failure raise with its last output line."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed: {tail[0]}")


def build_rows(recipe: str, workdir: Path, samples: int) -> list[Path]:
    """The folders of issue 12's table for ``recipe`` in ``workdir`` (module docstring)."""
    from fptq_onnx.data import text_path
    from fptq_onnx.models import prepare

    hf = prepare(recipe, progress=False)
    workdir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "fptq_onnx.cli", "-q"]
    folders = []
    fp32 = workdir / "builder-fp32"
    try:
        for name, options in BUILDER_ROWS.items():
            if not (workdir / name / "genai_config.json").is_file():
                run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(workdir / name),
                     "-e", "cpu", "-c", str(workdir / "builder-cache"), *options])
            folders.append(workdir / name)
    except RuntimeError as error:  # e.g. Gemma-3: KeyError 'rope_type'
        print(f"the GenAI model builder cannot build {recipe} ({error}); fp32 from our torch export, "
              "int4 rows from ORT's MatMulNBits quantizer", file=sys.stderr)
        folders, fp32 = [], workdir / "torch-fp32"
        if not (fp32 / "model.onnx").is_file():
            run([*cli, "export", str(hf), "-o", str(fp32 / "model.onnx"), "--exporter", "torch", "--with-past"])
        if not (fp32 / "genai_config.json").is_file():  # export writes none; GenAI needs one to run the fp32 row
            import onnx

            write_decoder_config(fp32, onnx.load(str(fp32 / "model.onnx"), load_external_data=False))
        folders.append(fp32)
        for name, (block, fused) in ORT_ROWS.items():
            if not (workdir / name / "genai_config.json").is_file():
                ort_int4_folder(fp32, workdir / name, block, fused)
            folders.append(workdir / name)
    calib = text_path("sotu", progress=False)
    for name, options in OURS_ROWS.items():
        out = workdir / name / "model.onnx"
        if not out.is_file():
            run([*cli, "convert", str(fp32 / "model.onnx"), "--calib", str(calib), "--samples", str(samples),
                 "-o", str(out), *options])
        folders.append(out.parent)
    return folders


def ort_int4_folder(fp32: Path, out: Path, block: int, fused: bool = False) -> None:
    """ORT's MatMulNBits quantizer (symmetric, ``block``, accuracy_level 4) on ``fp32``'s model
    (``fused``: after our RmsNormDivPass and FuseGeluPass), saved with a GenAI ``decoder`` config
    read off the graph (no custom-op library: MatMulNBits is ORT's own) and the tokenizer."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from fptq_onnx.passes.base import ConversionContext, PassManager
    from fptq_onnx.passes.fuse_gelu import FuseGeluPass
    from fptq_onnx.passes.rms_norm_div import RmsNormDivPass
    from fptq_onnx.tokenizer import copy_tokenizer

    model = onnx.load(str(fp32 / "model.onnx"))
    if fused:
        ctx = ConversionContext(graph=gs.import_onnx(model))
        PassManager([RmsNormDivPass(), FuseGeluPass()])(ctx)
        fused_model = gs.export_onnx(ctx.graph)
        if "com.microsoft" not in {o.domain for o in fused_model.opset_import}:  # FastGelu's
            fused_model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        model = fused_model
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    quantizer.model.save_model_to_file(str(staging / "model.onnx"), use_external_data_format=True)
    copy_tokenizer(fp32 / "model.onnx", staging / "model.onnx")
    write_decoder_config(staging, quantizer.model.model)
    staging.rename(out)


def write_decoder_config(folder: Path, model) -> None:
    """A GenAI ``decoder`` config for ``folder/model.onnx`` read off ``model``'s graph (no custom-op
    library: these rows run only ONNX Runtime's own ops)."""
    from fptq_onnx.genai import new_config

    config = new_config(model, "model.onnx", folder, with_library=False)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    from fptq_onnx.data import brown_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--build", metavar="RECIPE", help="first make issue 12's rows for this recipe (docstring)")
    parser.add_argument("--workdir", type=Path, help="where --build puts the folders")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of the fptq rows (default 32)")
    parser.add_argument("--threads", type=lambda text: [int(t) for t in text.split(",")], default=[2],
                        help="intra-op threads, e.g. 1,2 (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=25)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--ppl", action="store_true", help="Brown perplexity through GenAI's logits (3,072 tokens)")
    parser.add_argument("--profile", action="store_true", help="instead: ORT's time per op type of one --prefill "
                        "and one 1-token step, each folder's model.onnx with its genai_config library")
    args = parser.parse_args()
    folders = list(args.folders)
    if args.build:
        if args.workdir is None:
            parser.error("--build needs --workdir")
        folders += build_rows(args.build, args.workdir, args.samples)
    if not folders:
        parser.error("give model folders, or --build RECIPE --workdir DIR")
    if args.profile:
        for threads in args.threads:
            for folder in folders:
                for tokens in (args.prefill, 1):
                    print_profile(folder, tokens, threads)
        return
    text = brown_text(progress=False)
    perplexity = {}
    if args.ppl:
        from fptq_onnx.evaluate import evaluate_genai

        perplexity = {folder: evaluate_genai(folder, text, max_tokens=3072, progress=False)["perplexity"]
                      for folder in folders}
    print(f"CPU: {cpu_name()}, {time.strftime('%Y-%m-%d')}; decode: {args.new_tokens} tokens after a "
          f"{args.prompt_tokens}-token prompt; median of {args.rounds} interleaved rounds")
    print(f"| model folder | threads | decode tok/s | prefill {args.prefill} tokens ms |"
          + (" Brown ppl |" if perplexity else "") + " folder MB |")
    print("|---|---:|---:|---:|" + ("---:|" if perplexity else "") + "---:|")
    for threads in args.threads:
        decode, prefill = measure(folders, text[:20000], threads, args)
        for folder in folders:
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
            ppl = f" {perplexity[folder]:.2f} |" if perplexity else ""
            print(f"| {folder.name} | {threads} | {statistics.median(decode[folder]):.1f} | "
                  f"{statistics.median(prefill[folder]):.0f} |{ppl} {size:.0f} |", flush=True)


def measure(folders: list[Path], text: str, threads: int, args) -> tuple[dict, dict]:
    """Decode tok/s and prefill ms of every folder, ``args.rounds`` interleaved rounds each."""
    from fptq_onnx.genai_run import load_model

    loaded = {folder: load_model(folder, threads) for folder in folders}
    models = {folder: item.model for folder, item in loaded.items()}
    ids = list(next(iter(loaded.values())).tokenizer.encode(text))
    for model in models.values():  # warm-up outside the timing: weights repacked, buffers allocated
        prefill_ms(model, ids[:args.prefill])
    decode = {folder: [] for folder in models}
    prefill = {folder: [] for folder in models}
    for _ in range(args.rounds):
        for folder, model in models.items():
            time.sleep(0.1)  # let the previous session's spinning threads stop
            decode[folder].append(decode_rate(model, ids[:args.prompt_tokens], args.new_tokens))
            prefill[folder].append(prefill_ms(model, ids[:args.prefill]))
    return decode, prefill


def print_profile(folder: Path, tokens: int, threads: int, top: int = 8) -> None:
    """Milliseconds per op type (ORT's profiler, third of three runs) of ``tokens`` tokens after an
    empty cache: where a prefill or a decode step of the folder's model spends its time."""
    import collections
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    from fptq_onnx.calibration import complete_feed, model_inputs
    from fptq_onnx.genai import kv_head_size, read_config

    config = read_config(folder / "model.onnx")
    if config is None:
        raise SystemExit(f"{folder}: no genai_config.json (give GenAI model folders)")
    decoder = config["model"]["decoder"]
    path = folder / decoder["filename"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    library = decoder.get("session_options", {}).get("custom_ops_library")
    if library:
        options.register_custom_ops_library(str(folder / library))
    inputs = model_inputs(onnx.load(path, load_external_data=False))
    ids = np.random.default_rng(0).integers(0, 1000, (1, tokens))
    feed = complete_feed({"input_ids": ids}, inputs, path, kv_head_size(path))
    with tempfile.TemporaryDirectory() as profile_dir:  # ORT writes one JSON per session
        options.profile_file_prefix = str(Path(profile_dir) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    last_run = [e for e in events if e.get("name") == "model_run"][-1]
    per_op, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= last_run["ts"]:
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3
            count[event["args"]["op_name"]] += 1
    print(f"{folder.name}, {tokens} tokens, {threads} threads: {last_run['dur'] / 1e3:.1f} ms; "
          + ", ".join(f"{op} x{count[op]} {ms:.1f}" for op, ms in per_op.most_common(top)), flush=True)


if __name__ == "__main__":
    main()
