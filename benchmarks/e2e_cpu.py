#!/usr/bin/env python3
"""End-to-end CPU speed of a language model: FP32 ONNX vs its W4A8 conversion with libfptq_ops.so.

Both models run in onnxruntime on CPUExecutionProvider with the same SessionOptions (intra-op
threads ``--threads``, default 2; sequential execution), batch 1:

* ``prefill``: one forward pass over ``--seq`` tokens (default 512);
* ``step``: one forward pass over a single token. The exported models have no KV cache, so a
  decoding step of such a model *is* a forward pass of sequence length 1 (the linear layers
  then run at M = 1: the memory-bound case of the kernel).

Optionally (``--matmulnbits``) also ONNX Runtime's own 4-bit path: the FP32 model's MatMuls
quantized by ``onnxruntime.quantization.MatMulNBitsQuantizer`` (asymmetric, block G,
accuracy_level=4, the int8-activation kernels), with the same layers left in float as in our
conversion (the tied language-model head, whose N is the vocabulary size).

The W4A8 model is made if missing with the project's CLI,
``fptq-onnx convert FP32 --calib sotu.txt --group-size G -o W4A8`` (``--calib-samples``
sequences; speed does not depend on them). G (``--group-size``) defaults to the CLI's 128; for
SmolLM2, whose hidden size 576 is not a multiple of 128, the converter pads K to 640 (a Pad node
before the op), while 64 divides every K of the model.

The prefill input is a window of real text (the ``brown`` corpus, not the calibration text),
led by BOS when the model expects one; the single-token step feeds its last token. Times are
medians over interleaved rounds (noise from other processes hits all models alike), with a
pause before each model's turn: ONNX Runtime's intra-op threads spin for ~30 ms after a run and
each session has its own, so the previous model's threads would otherwise share the CPU with
the one being timed. Sanity check printed with the table: how often each model's top-1
next-token prediction agrees with FP32's over the prefill's positions.

    python3 benchmarks/e2e_cpu.py [--fp32 PATH] [--w4a8 PATH] [--threads 2] [--quick] [--matmulnbits]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fptq_onnx  # noqa: E402
from cpu_gemm import cpu_model_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from fptq_onnx import data  # noqa: E402

FP32_CANDIDATES = [
    REPO / "work-cache" / "smollm2" / "model.onnx",
    data.cache_dir() / "tests" / "smollm2-135m.onnx",  # made by tests/test_e2e_smollm2.py
]
OUT_DIR = REPO / "work-cache" / "e2e"
SETTLE_S = 0.1  # > the ~30 ms that ORT's idle intra-op threads spin after a run


def model_stem(fp32: Path) -> str:
    """A name for files made from fp32: its stem, or its folder's name for a generic model.onnx."""
    return fp32.stem if fp32.stem != "model" else fp32.parent.name


def make_w4a8(fp32: Path, out: Path, samples: int, group_size: int) -> None:
    calib = data.text_path("sotu", progress=False)
    cli = Path(sys.executable).with_name("fptq-onnx")
    command = [str(cli) if cli.exists() else "fptq-onnx", "convert", str(fp32), "--calib", str(calib),
               "--samples", str(samples), "--group-size", str(group_size), "--tokenizer", str(fp32.parent),
               "-o", str(out)]
    print("running:", " ".join(command), file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(command, check=True)


def make_matmulnbits(fp32: Path, out: Path, vocab: int, group_size: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    # Leave the language-model head in float, as `fptq-onnx convert` does by default.
    head = [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2 and shapes[n.input[1]][1] == vocab]
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=group_size, is_symmetric=False, accuracy_level=4,
                                     nodes_to_exclude=head)
    quantizer.process()
    out.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def session(path: Path, threads: int, ours: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if ours:
        return fptq_onnx.InferenceSession(str(path), options)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    out = {"input_ids": ids}
    if "attention_mask" in names:
        out["attention_mask"] = np.ones_like(ids)
    return out


def text_window(fp32: Path, length: int) -> np.ndarray:
    """int64 [1, length]: token ids of real text, cut like the calibration and evaluation windows."""
    from fptq_onnx.tokenizer import find_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer(fp32) or fp32.parent)
    text = data.text_path("brown", progress=False).read_text(encoding="utf-8")[:200_000]
    window = tokenizer.windows(tokenizer.encode(text), length)[3]
    return np.asarray([window], np.int64)


def vocab_size(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", type=Path, default=None, help="FP32 model (default: the SmolLM2-135M export)")
    parser.add_argument("--w4a8", type=Path, default=None,
                        help=f"W4A8 model (default {OUT_DIR}/<fp32 stem>.w4a8.onnx, converted if missing)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every model (default 2)")
    parser.add_argument("--seq", type=int, default=512, help="tokens of the prefill pass (default 512)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a rough pass)")
    parser.add_argument("--rounds", type=int, default=None, help="timed prefill rounds (default 10, quick 3)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration sequences for the conversion")
    parser.add_argument("--group-size", type=int, default=128,
                        help="4-bit group size of the conversions (default 128, the CLI's)")
    parser.add_argument("--matmulnbits", action="store_true",
                        help="also time ORT's MatMulNBits (accuracy_level=4) quantization of the FP32 model")
    args = parser.parse_args()

    fp32 = args.fp32 or next((p for p in FP32_CANDIDATES if p.exists()), None)
    if fp32 is None:
        raise SystemExit("no FP32 model: pass --fp32 (looked in " + ", ".join(map(str, FP32_CANDIDATES)) + ")")
    stem = model_stem(fp32)
    w4a8 = args.w4a8 or OUT_DIR / f"{stem}.w4a8-g{args.group_size}.onnx"
    if not w4a8.exists():
        make_w4a8(fp32, w4a8, args.calib_samples, args.group_size)
    vocab = vocab_size(fp32)
    models = {"FP32": (fp32, False), "W4A8 (ours)": (w4a8, True)}
    if args.matmulnbits:
        nbits = OUT_DIR / f"{stem}.matmulnbits-acc4-g{args.group_size}.onnx"
        if not nbits.exists():
            make_matmulnbits(fp32, nbits, vocab, args.group_size)
        models["MatMulNBits acc4"] = (nbits, False)

    sessions = {name: session(path, args.threads, ours) for name, (path, ours) in models.items()}
    prefill_ids = text_window(fp32, args.seq)
    step_ids = prefill_ids[:, -1:]

    logits = {name: s.run(None, feeds(s, prefill_ids))[0] for name, s in sessions.items()}  # also warm-up
    top1 = {name: l[0].argmax(-1) for name, l in logits.items()}
    for s in sessions.values():
        s.run(None, feeds(s, step_ids))

    rounds = args.rounds or (3 if args.quick else 10)
    steps_per_round = 5 if args.quick else 20
    prefill = {name: [] for name in sessions}
    step = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            f = feeds(s, prefill_ids)
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            s.run(None, f)
            prefill[name].append(time.perf_counter() - start)
            f = feeds(s, step_ids)
            for _ in range(steps_per_round):
                start = time.perf_counter()
                s.run(None, f)
                step[name].append(time.perf_counter() - start)

    base_prefill, base_step = statistics.median(prefill["FP32"]), statistics.median(step["FP32"])
    print(f"CPU: {cpu_model_name()}; onnxruntime {ort.__version__}; intra-op threads: {args.threads}; "
          f"batch 1; {rounds} prefill rounds, {rounds * steps_per_round} steps; medians")
    print(f"FP32: {fp32}")
    for name, (path, _) in models.items():
        if name != "FP32":
            print(f"{name}: {path}")
    print(f"| model | prefill {args.seq} tokens (ms) | tokens/s | vs FP32 | 1-token step (ms) | vs FP32 "
          f"| top-1 agreement with FP32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in sessions:
        p, t = statistics.median(prefill[name]), statistics.median(step[name])
        agree = float((top1[name] == top1["FP32"]).mean())
        print(f"| {name} | {p * 1e3:.1f} | {args.seq / p:.0f} | {base_prefill / p:.2f}x | {t * 1e3:.2f} "
              f"| {base_step / t:.2f}x | {agree:.1%} |")


if __name__ == "__main__":
    main()
