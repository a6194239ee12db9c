"""Time the weight-clipping search (``quant.output_error_clip_ratios``) on one layer, printing a table.

    python benchmarks/clip_search.py                       # 8192 x 2048, the synthetic decoder's down_proj
    python benchmarks/clip_search.py --k 2048 --n 8192

Random N(0, 1/K) weights, calibration rows with 1% outlier channels (x6), the 128 x 128 diagonal
blocks of X^T X as the pipeline keeps them. Uses only the public function, so the same script
times an older checkout (docs/large-models.md has both figures).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cpu_gemm import cpu_model_name  # benchmarks/ is on sys.path when run as a script

from fptq_onnx.quant import output_error_clip_ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    k, n, g = args.k, args.n, args.group_size
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((512, k)).astype(np.float32) * (1 + 5 * (rng.random(k) < 0.01))
    blocks = np.stack([x[:, i:i + g].T.astype(np.float64) @ x[:, i:i + g] / len(x) for i in range(0, k, g)])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        output_error_clip_ratios(w, blocks, g, symmetric=False)
        times.append(time.perf_counter() - start)
    print(f"clip search, {cpu_model_name()}, {time.strftime('%Y-%m-%d')}")
    print("| K | N | group | seconds (median of %d) | ns per weight |" % args.repeats)
    print("|---|---|---|---|---|")
    median = float(np.median(times))
    print(f"| {k} | {n} | {g} | {median:.2f} | {median / (k * n) * 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
