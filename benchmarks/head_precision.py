#!/usr/bin/env python3
"""The language-model head alone: Brown perplexity with the float model's final hidden states and
the head's weight quantized several ways (activations stay float), and the relative weight errors.

    python benchmarks/head_precision.py [--model gemma3-270m] [--windows 3] [--top-k 16,64,256,1024]
                                        [--lae-from CONVERTED_DIR]

Rows: float; 8 bits per channel; 4-bit g128; ``Q(W) + R`` on every logit (``quant.quantize_weight_residual``);
the rescored head (``Q(W)``, ``Q(W) + R`` on each token's top-k by ``Q(W)``, as ``W4A8RescoredMatMul``).
``--lae-from`` takes the head's LAE scales ``s`` from a converted model's tied embedding
(``lm_head/tied_embedding.inverse_lae_scales``) and quantizes ``diag(s) W`` for the input ``x / s``,
as that model's head does. docs/accuracy.md "The rescored head" has the figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fptq_onnx import quant
    from fptq_onnx.data import brown_text
    from fptq_onnx.models import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--windows", type=int, default=3, help="512-token Brown windows (default 3)")
    parser.add_argument("--top-k", default="16,64,256,1024")
    parser.add_argument("--lae-from", type=Path, help="a converted model folder whose head has LAE scales")
    args = parser.parse_args()
    hf = prepare(args.model, progress=False)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(hf)(brown_text(progress=False))["input_ids"][:512 * args.windows + 1]
    w = model.lm_head.weight.detach().double().numpy().T  # [K, N]
    k = w.shape[0]
    s = np.ones(k)
    if args.lae_from is not None:
        converted = onnx.load(str(args.lae_from / "model.onnx"))
        s = 1.0 / numpy_helper.to_array(next(t for t in converted.graph.initializer
                                             if t.name == "lm_head/tied_embedding.inverse_lae_scales")).astype(np.float64)
    w = w * s[:, None]
    u, scales, zeros = quant.quantize_weight_groupwise(w, 128, symmetric=False)
    coarse = quant.dequantize_weight(u, scales, zeros, 128)
    fine = coarse + quant.dequantize_weight(*quant.quantize_weight_residual(w, u, scales, zeros, 128), 128)
    eight = quant.dequantize_weight(*quant.quantize_weight_groupwise_int8(w, k + k % 2, symmetric=False), k + k % 2)
    for name, q in (("4-bit g128", coarse), ("Q(W) + R", fine), ("8 bits per channel", eight)):
        print(f"relative weight error, {name}: {np.linalg.norm(w - q) / np.linalg.norm(w):.4f}")
    heads = {name: torch.from_numpy(q.astype(np.float32))
             for name, q in (("float", w), ("8 bits per channel", eight), ("4-bit g128", coarse), ("Q(W) + R", fine))}
    top_ks = [int(t) for t in args.top_k.split(",")]
    nll = dict.fromkeys([*heads, *(f"rescored, top-k {t}" for t in top_ks)], 0.0)
    inverse_s = torch.from_numpy((1.0 / s).astype(np.float32))
    with torch.no_grad():
        for start in range(0, 512 * args.windows, 512):
            window = torch.tensor([ids[start:start + 513]])
            x = model.model(input_ids=window[:, :-1]).last_hidden_state[0] * inverse_s
            target = window[0, 1:]

            def score(logits):
                logits = logits.double()
                return (torch.logsumexp(logits, -1) - logits.gather(1, target[:, None])[:, 0]).sum().item()

            logits = {name: x @ head for name, head in heads.items()}
            for name, value in logits.items():
                nll[name] += score(value)
            for t in top_ks:
                top = logits["4-bit g128"].topk(t, dim=-1).indices
                rescored = logits["4-bit g128"].scatter(1, top, logits["Q(W) + R"].gather(1, top))
                nll[f"rescored, top-k {t}"] += score(rescored)
    tokens = 512 * args.windows
    print(f"| head ({args.model}, Brown {tokens} tokens{', LAE scales' if args.lae_from else ''}) | ppl |\n|---|---:|")
    for name, value in nll.items():
        print(f"| {name} | {np.exp(value / tokens):.2f} |")


if __name__ == "__main__":
    main()
