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
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


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


def main() -> None:
    from fptq_onnx.data import brown_text
    from fptq_onnx.genai_run import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=25)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    args = parser.parse_args()
    text = brown_text(progress=False)[:20000]
    loaded = {folder: load_model(folder, args.threads) for folder in args.folders}
    models = {folder: item.model for folder, item in loaded.items()}
    ids = list(next(iter(loaded.values())).tokenizer.encode(text))
    decode = {folder: [] for folder in models}
    prefill = {folder: [] for folder in models}
    for _ in range(args.rounds):
        for folder, model in models.items():
            time.sleep(0.1)  # let the previous session's spinning threads stop
            decode[folder].append(decode_rate(model, ids[:args.prompt_tokens], args.new_tokens))
            prefill[folder].append(prefill_ms(model, ids[:args.prefill]))
    print(f"CPU: {cpu_name()}, {args.threads} threads, {time.strftime('%Y-%m-%d')}")
    print(f"| model folder | decode tok/s | prefill {args.prefill} tokens ms | folder MB |")
    print("|---|---:|---:|---:|")
    for folder in models:
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
        print(f"| {folder.name} | {statistics.median(decode[folder]):.1f} | {statistics.median(prefill[folder]):.0f} | {size:.0f} |")


if __name__ == "__main__":
    main()
