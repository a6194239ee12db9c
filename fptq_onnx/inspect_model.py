"""``fptq-onnx inspect``: what a model converted by fptq-onnx holds, read from the file alone.

The model is loaded without its external data (sizes come from tensor shapes), so inspecting a
multi-GiB model takes as long as parsing its graph. Reported: the W4A8MatMul nodes (and the
W8A8MatMul nodes of layers kept at 8-bit weights) by activation scheme and group size, bytes of
packed weights (nibbles or bytes + scales + zero points)
against the float32 weights they replace, the LAE and padding nodes the compiler inserted, and
whether our op library is needed. A pass dump (``--dump-passes``) from before the replacement is
recognized by its decisions; anything else is not one of ours and is a user error.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from .errors import UserError
from .model_io import load_model
from .op_contract import OP_DOMAIN, OP_TYPE, RESCORED_OP_TYPE, W8A8_OP_TYPE
from .quant import ActMode

RUNS_STOCK = "runs in stock onnxruntime via the function body; fptq_onnx.InferenceSession for the fast kernel"
LAYER_OPS = {OP_TYPE: 4, W8A8_OP_TYPE: 8, RESCORED_OP_TYPE: 4}  # op type -> bits per weight read (the rescored
# head stores 8: its 4-bit weight and 4-bit residual)
NEEDS_LIBRARY = ("needs the fptq op library (no function body): fptq_onnx.InferenceSession, or "
                 "SessionOptions.register_custom_ops_library(fptq_onnx.library_path())")


def _decisions(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key[len("fptq."):]: p.value for p in node.metadata_props if p.key.startswith("fptq.")}


def _tensor_bytes(tensor: onnx.TensorProto | None) -> int:
    if tensor is None:
        return 0
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def inspect_model(path: str | Path) -> dict:
    """A JSON-ready summary of the fptq-onnx model at ``path`` (see the module docstring).

    Raises :class:`UserError` when the file is not ONNX or has neither ``ai.fptq`` nodes nor
    fptq decisions.
    """
    path = Path(path)
    model = load_model(path, load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    ours = [n for n in model.graph.node if n.domain == OP_DOMAIN]
    annotated = [n for n in model.graph.node if n.domain != OP_DOMAIN and _decisions(n)]
    if not ours and not annotated:
        raise UserError(f"{path} is not a model converted by fptq-onnx (no {OP_DOMAIN} nodes): "
                        "run fptq-onnx convert on it first")
    layers = [_layer_info(node, initializers) for node in ours if node.op_type in LAYER_OPS]
    by_role = Counter(_decisions(n).get("role", "") for n in annotated)
    inserted = {role: [n.name for n in annotated if _decisions(n).get("role") == role]
                for role in ("lae_scale", "lae_folded", "pad_k", "bias")}
    bodies = {f.name for f in model.functions if f.domain == OP_DOMAIN}
    has_function = {n.op_type for n in ours} <= bodies  # every op used carries its function body
    packed = sum(layer["packed_bytes"] for layer in layers)
    replaced = sum(layer["fp32_bytes"] for layer in layers)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return {
        "path": str(path),
        "kind": "converted" if layers else "pass_dump",
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "w4a8_nodes": sum(layer["weight_bits"] == 4 for layer in layers),
        "w8a8_nodes": sum(layer["weight_bits"] == 8 for layer in layers),
        "other_fptq_nodes": sorted({n.op_type for n in ours if n.op_type not in LAYER_OPS}),
        "by_scheme": dict(sorted(Counter(layer["scheme"] for layer in layers).items())),
        "group_sizes": sorted({layer["group_size"] for layer in layers}),
        "packed_bytes": packed,
        "replaced_fp32_bytes": replaced,
        "bytes_saved": replaced - packed,
        "initializer_bytes": sum(_tensor_bytes(t) for t in model.graph.initializer),
        "external_data": external,
        "inserted_nodes": inserted,
        "annotated_layers": sum(count for role, count in by_role.items() if role == "layer"),
        "function_body": has_function,
        "op_library": RUNS_STOCK if has_function else NEEDS_LIBRARY,
        "layers": layers,
    }


def _layer_info(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> dict:
    attrs, decisions = _attrs(node), _decisions(node)
    k_op, n = attrs.get("K", 0), attrs.get("N", 0)
    k = k_op
    if " -> " in decisions.get("k_padded", ""):  # "576 -> 640": the layer's own K, then the op's
        k = int(decisions["k_padded"].split(" -> ")[0])
    weights = [*node.input[1:4], *node.input[5:8]]  # packed, scales, zero points (and the rescored head's residual)
    mode = attrs.get("act_mode")
    scheme = str(ActMode(mode)) if mode in set(ActMode) else f"act_mode {mode}"
    if decisions.get("lae") == "yes":
        scheme += " + LAE"
    return {
        "name": node.name,
        "layer": decisions.get("layer", node.name.rpartition("/")[0] or node.name),
        "weight_bits": LAYER_OPS[node.op_type],
        "scheme": scheme,
        "group_size": attrs.get("group_size"),
        "K": k, "K_op": k_op, "N": n,
        "packed_bytes": sum(_tensor_bytes(initializers.get(name)) for name in weights),
        "fp32_bytes": 4 * k * n,
        "decisions": decisions,
    }


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB" if count >= 2**16 else f"{count / 2**10:.1f} KiB"


def format_inspection(info: dict, layers: bool = False) -> str:
    """Readable lines for :func:`inspect_model`'s result (every layer too with ``layers``)."""
    name = Path(info["path"]).name
    if info["kind"] == "pass_dump":
        return (f"{name}: an fptq-onnx pass dump before replace_matmul: {info['annotated_layers']} linear "
                f"layers annotated with decisions, no W4A8MatMul nodes yet (opset {info['opset']})")
    w8 = f", {info['w8a8_nodes']} {W8A8_OP_TYPE} (8-bit weights)" if info["w8a8_nodes"] else ""
    lines = [f"{name}: {info['w4a8_nodes']} {OP_TYPE} nodes{w8} ({OP_DOMAIN}), opset {info['opset']}"]
    lines.append("  by scheme: " + ", ".join(f"{count} x {scheme}" for scheme, count in info["by_scheme"].items()))
    lines.append("  group size: " + ", ".join(map(str, info["group_sizes"])))
    ratio = info["replaced_fp32_bytes"] / info["packed_bytes"] if info["packed_bytes"] else 0
    widths = "4- and 8-bit" if w8 else "4-bit"
    lines.append(f"  packed weights: {_mib(info['packed_bytes'])} ({widths} + scales + zero points) replacing "
                 f"{_mib(info['replaced_fp32_bytes'])} of fp32: {_mib(info['bytes_saved'])} saved ({ratio:.1f}x smaller)")
    lines.append(f"  all initializers: {_mib(info['initializer_bytes'])}"
                 + (" (external data)" if info["external_data"] else ""))
    inserted = info["inserted_nodes"]
    lae = [f"{len(inserted['lae_scale'])} Mul node(s) by 1/s", f"{len(inserted['lae_folded'])} folded into a norm"]
    lines.append("  LAE: " + ", ".join(lae) + (f" ({', '.join(inserted['lae_scale'][:3])}"
                                               f"{' ...' if len(inserted['lae_scale']) > 3 else ''})"
                                               if inserted["lae_scale"] else ""))
    if inserted["pad_k"]:
        lines.append(f"  K padded to the group size: {len(inserted['pad_k'])} Pad node(s)")
    if inserted["bias"]:
        lines.append(f"  Gemm bias: {len(inserted['bias'])} Add node(s) after the layer's op")
    if info["other_fptq_nodes"]:
        lines.append(f"  other {OP_DOMAIN} ops: {', '.join(info['other_fptq_nodes'])}")
    lines.append(f"  op library: {'not needed: ' if info['function_body'] else ''}{info['op_library']}")
    if layers:
        width = max(len(layer["layer"]) for layer in info["layers"])
        lines.append(f"  {'layer':{width}s}  {'K x N':>11s}  {'bits':>4s}  {'g':>4s}  {'packed':>10s}  {'w err':>7s}  "
                     f"{'out err':>7s}  scheme")
        for layer in info["layers"]:
            d = layer["decisions"]
            shape = f"{layer['K']}x{layer['N']}"
            lines.append(f"  {layer['layer']:{width}s}  {shape:>11s}  {layer['weight_bits']:>4d}  "
                         f"{layer['group_size']:>4d}  {_mib(layer['packed_bytes']):>10s}  {d.get('weight_error', '-'):>7s}  "
                         f"{d.get('output_error', '-'):>7s}  {layer['scheme']}")
    return "\n".join(lines)
