"""The contract of our ops (``ai.fptq::W4A8MatMul`` and ``W8A8MatMul``, ``docs/ops.md``): their
names, domain version and model-local ONNX functions, the executable definition in standard ops.

Every converted model carries this function, so stock ONNX Runtime runs the model without our
op library (it inlines the body where no kernel is registered for ``ai.fptq::W4A8MatMul``),
and the kernels are tested against it. The body follows ``docs/ops.md`` step by step:

* weights: ``u`` = low nibble (even k) / high nibble (odd k) of ``B[N, ceil(K/2)]``;
  ``W[k, n] = (u[n, k] - z[n, g]) * scale[n, g]``; a last partial group (``K % group_size != 0``)
  is padded to a whole group inside the body and the padding cut off W again;
* activations, computed in float32: ``q = clip(round_half_even(x * (1 / a)), -127, 127)`` with
  ``a = act_scale`` (``act_mode = 0``, per-tensor static) or ``a_m = max_k |x[m, k]| / 127``
  (``act_mode = 1``, per-token dynamic, ``a_m = 1`` for an all-zero row, or any row whose
  ``a_m`` is below 2^-126, where ``1 / a_m`` would overflow);
* ``Y = (q * a) @ W``, cast back to the type of X.

Layers kept at 8-bit weights (mixed precision, ``W8A8MatMul``: the same contract with ``u`` the
bytes of ``B[N, K]``) share everything but the unpacking of ``B``.

The language-model head may be ``W4A8RescoredMatMul``: ``C = W4A8MatMul(X, B, ...)`` on every
channel and, on the ``top_k`` channels of each row with the largest ``C`` (ties: the lower one),
``C + R`` with ``R = W4A8MatMul(X, residual_B, ...)``, the 4-bit residual of the head's weight.
Its body calls the two W4A8MatMul functions and selects with ``TopK`` / ``ScatterElements``.

Both activation paths are computed and one is selected with ``Where`` on the ``act_mode``
attribute: a function body cannot branch on an attribute otherwise, and the fallback path is
about portability, not speed.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

OP_DOMAIN = "ai.fptq"
OP_TYPE = "W4A8MatMul"
W8A8_OP_TYPE = "W8A8MatMul"
RESCORED_OP_TYPE = "W4A8RescoredMatMul"  # the language-model head (docs/ops.md), since version 2
# Version of the ai.fptq domain the models import. 2: W8A8MatMul with W4A8MatMul's inputs
# (docs/ops.md); version 1 (sessions 4-5) had int8 W[K, N] with per-channel scales. Our kernel
# serves W8A8MatMul from version 2 only, so version-1 models still run their own function body.
# W4A8MatMul is unchanged since version 1.
OP_VERSION = 2
MIN_OPSET = 15  # CastLike

# Activation quantization shared by both functions: ``x`` (float32) -> ``q`` (integer-valued
# float32 in [-127, 127]) and its scale ``a`` (a scalar, or ``a[..., 1]`` per token).
_ACTIVATION_TEXT = """
    x = Cast <to = 1> (X)
    last_axis = Constant <value_ints = [-1]> ()
    int8_max = Constant <value = float {{127.0}}> ()
    int8_min = Constant <value = float {{-127.0}}> ()
    one = Constant <value = float {{1.0}}> ()
    min_normal = Constant <value = float {{1.17549435e-38}}> ()

    static_scale = Cast <to = 1> (act_scale)
    static_inv = Reciprocal (static_scale)
    static_scaled = Mul (x, static_inv)
    static_rounded = Round (static_scaled)
    static_q = Clip (static_rounded, int8_min, int8_max)

    x_abs = Abs (x)
    {token_amax}
    token_scale_raw = Div (token_amax, int8_max)
    token_is_tiny = Less (token_scale_raw, min_normal)
    token_scale = Where (token_is_tiny, one, token_scale_raw)
    token_inv = Reciprocal (token_scale)
    token_scaled = Mul (x, token_inv)
    token_rounded = Round (token_scaled)
    token_q = Clip (token_rounded, int8_min, int8_max)

    mode = Constant <value_int: int = @act_mode> ()
    dynamic_mode = Constant <value_int = 1> ()
    is_dynamic = Equal (mode, dynamic_mode)
    q = Where (is_dynamic, token_q, static_q)
    a = Where (is_dynamic, token_scale, static_scale)
"""

# Both ops' body: activations, the op's own unpacking of B into u_nk (float32 [N, K or K + 1],
# the integers u), then W = (u - z) * scale per group and the float MatMul. u_nk is padded to
# G * group_size (G from scales' shape) so that it reshapes into whole groups, and W is cut back
# to its first K rows: what the padding held never reaches Y.
_BODY_TEXT = """
<domain: "{OP_DOMAIN}", opset_import: ["" : {opset}]>
{OP_TYPE} <K, N, group_size, act_mode> (X, B, scales, zero_points, act_scale) => (Y)
{{
{activation}
    keep_n_rest = Constant <value_ints = [0, -1]> ()
{unpack}
    group_size_scalar = Constant <value_int: int = @group_size> ()
    group_size_1d = Unsqueeze (group_size_scalar, last_axis)
    groups_1d = Shape <start = 1, end = 2> (scales)
    whole_k_1d = Mul (groups_1d, group_size_1d)
    stored_k_1d = Shape <start = 1, end = 2> (u_nk)
    pad_k_1d = Sub (whole_k_1d, stored_k_1d)
    no_pad_3 = Constant <value_ints = [0, 0, 0]> ()
    u_pads = Concat <axis = 0> (no_pad_3, pad_k_1d)
    u_whole = Pad (u_nk, u_pads)
    grouped_shape = Concat <axis = 0> (keep_n_rest, group_size_1d)
    u_grouped = Reshape (u_whole, grouped_shape)
    zero_points_f = Cast <to = 1> (zero_points)
    zero_points_3d = Unsqueeze (zero_points_f, last_axis)
    scales_f = Cast <to = 1> (scales)
    scales_3d = Unsqueeze (scales_f, last_axis)
    centered = Sub (u_grouped, zero_points_3d)
    w_grouped = Mul (centered, scales_3d)
    w_whole = Reshape (w_grouped, keep_n_rest)
    k_scalar = Constant <value_int: int = @K> ()
    k_1d = Unsqueeze (k_scalar, last_axis)
    zero_1d = Constant <value_ints = [0]> ()
    one_1d = Constant <value_ints = [1]> ()
    w_nk = Slice (w_whole, zero_1d, k_1d, one_1d)
    w_kn = Transpose <perm = [1, 0]> (w_nk)

    x_dq = Mul (q, a)
    y = MatMul (x_dq, w_kn)
    Y = CastLike (y, X)
}}
"""

# W4A8MatMul: B[N, K/2], u of even k the low nibble, of odd k the high one (byte = lo + 16 hi).
_UNPACK_NIBBLES_TEXT = """
    packed_f = Cast <to = 1> (B)
    sixteen = Constant <value = float {16.0}> ()
    inv_sixteen = Constant <value = float {0.0625}> ()
    high_scaled = Mul (packed_f, inv_sixteen)
    u_odd_f = Floor (high_scaled)
    high_part = Mul (u_odd_f, sixteen)
    u_even_f = Sub (packed_f, high_part)
    u_even_3d = Unsqueeze (u_even_f, last_axis)
    u_odd_3d = Unsqueeze (u_odd_f, last_axis)
    u_pairs = Concat <axis = -1> (u_even_3d, u_odd_3d)
    u_nk = Reshape (u_pairs, keep_n_rest)
"""

# W8A8MatMul: B[N, K] holds u itself.
_UNPACK_BYTES_TEXT = """
    u_nk = Cast <to = 1> (B)
"""


# W4A8RescoredMatMul: C and C + R from two W4A8MatMul calls (the same activations), C + R on the
# top_k channels of C. TopK keeps the lower index of equal values, as the kernel does.
_RESCORED_TEXT = """
<domain: "{OP_DOMAIN}", opset_import: ["" : {opset}, "{OP_DOMAIN}" : {version}]>
{RESCORED_OP_TYPE} <K, N, group_size, act_mode, top_k> (X, B, scales, zero_points, act_scale, residual_B,
    residual_scales, residual_zero_points) => (Y)
{{
    coarse = {OP_DOMAIN}.{OP_TYPE} <K: int = @K, N: int = @N, group_size: int = @group_size,
        act_mode: int = @act_mode> (X, B, scales, zero_points, act_scale)
    residual = {OP_DOMAIN}.{OP_TYPE} <K: int = @K, N: int = @N, group_size: int = @group_size,
        act_mode: int = @act_mode> (X, residual_B, residual_scales, residual_zero_points, act_scale)
    fine = Add (coarse, residual)
    k_scalar = Constant <value_int: int = @top_k> ()
    last_axis = Constant <value_ints = [-1]> ()
    k_1d = Unsqueeze (k_scalar, last_axis)
    top_values, top_channels = TopK <axis = -1, largest = 1, sorted = 1> (coarse, k_1d)
    fine_top = GatherElements <axis = -1> (fine, top_channels)
    Y = ScatterElements <axis = -1> (coarse, top_channels, fine_top)
}}
"""


def _function(op_type: str, unpack: str, opset: int) -> onnx.FunctionProto:
    if opset < MIN_OPSET:
        raise ValueError(f"the {op_type} function body needs ONNX opset >= {MIN_OPSET}, the model has {opset}")
    token_amax = ("token_amax = ReduceMax <keepdims = 1> (x_abs, last_axis)" if opset >= 18
                  else "token_amax = ReduceMax <keepdims = 1, axes = [-1]> (x_abs)")
    activation = _ACTIVATION_TEXT.format(token_amax=token_amax)
    return onnx.parser.parse_function(_BODY_TEXT.format(OP_DOMAIN=OP_DOMAIN, OP_TYPE=op_type, opset=opset,
                                                        activation=activation, unpack=unpack))


def w4a8_function(opset: int = 18) -> onnx.FunctionProto:
    """A fresh copy of the W4A8MatMul function (``ai.fptq``, since version 1) for ONNX ``opset``.

    The body imports the model's own default opset (ONNX requires functions and model to agree);
    only ReduceMax differs across opsets (axes became an input in 18).
    """
    return _function(OP_TYPE, _UNPACK_NIBBLES_TEXT, opset)


def w8a8_function(opset: int = 18) -> onnx.FunctionProto:
    """The W8A8MatMul function (mixed-precision layers, ``ai.fptq`` since version 2): W4A8MatMul's
    body with ``u`` the bytes of ``B[N, K]``. ONNX Runtime runs it where our kernel is not
    loaded."""
    return _function(W8A8_OP_TYPE, _UNPACK_BYTES_TEXT, opset)


def rescored_function(opset: int = 18) -> onnx.FunctionProto:
    """The W4A8RescoredMatMul function (the head, ``ai.fptq`` since version 2): two calls of the
    W4A8MatMul function, which the model must carry too (:func:`add_w4a8_function` adds both)."""
    if opset < MIN_OPSET:
        raise ValueError(f"the {RESCORED_OP_TYPE} function body needs ONNX opset >= {MIN_OPSET}, the model has {opset}")
    return onnx.parser.parse_function(_RESCORED_TEXT.format(
        OP_DOMAIN=OP_DOMAIN, OP_TYPE=OP_TYPE, RESCORED_OP_TYPE=RESCORED_OP_TYPE, opset=opset, version=OP_VERSION))


def add_w4a8_function(model: onnx.ModelProto) -> None:
    """Attach the function (at the model's opset) and the ``ai.fptq`` opset import (idempotent).

    Raises ValueError for a model older than opset 15.
    """
    imports = {o.domain: o for o in model.opset_import}
    default = imports.get("") or imports.get("ai.onnx")
    if default is None:
        default = onnx.helper.make_opsetid("", 18)
        model.opset_import.append(default)
    if OP_DOMAIN not in imports:
        model.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, OP_VERSION))
    else:  # graphsurgeon's export imports every domain its nodes use at version 1
        imports[OP_DOMAIN].version = OP_VERSION
    if not any(f.domain == OP_DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(w4a8_function(default.version))
    used = {node.op_type for node in model.graph.node if node.domain == OP_DOMAIN}
    present = {f.name for f in model.functions if f.domain == OP_DOMAIN}
    for op_type, make in ((W8A8_OP_TYPE, w8a8_function), (RESCORED_OP_TYPE, rescored_function)):
        if op_type in used and op_type not in present:
            model.functions.append(make(default.version))


def single_op_model(weights: dict, act_scale, *, k: int, n: int, group_size: int, act_mode: int, x_rank: int = 2,
                    graph_inputs=(), attrs: dict | None = None, function: onnx.FunctionProto | None = None,
                    x_type: int = onnx.TensorProto.FLOAT, op_type: str = OP_TYPE, top_k: int | None = None) -> bytes:
    """A serialized model of one W4A8MatMul (or W8A8MatMul) node ``Y = op(X, B, S, Z, A)`` and the
    op's function: what the kernel tests and benchmarks run on each backend.

    weights: ``{"B": uint8 [N, K/2], "S": float32 [N, G], "Z": uint8 [N, G]}``
    (``quant.pack_int4`` / ``quantize_weight_groupwise``; for W8A8MatMul B is uint8 [N, K] from
    ``quantize_weight_groupwise_int8``); act_scale: the ``A`` input;
    k, n, group_size, act_mode: the node's attributes (``attrs`` replaces them all, for
    invalid-attribute tests); x_rank: rank of X, every dim dynamic (so that the kernel, not
    ORT's graph-input check, sees a wrong last dim); graph_inputs: names among B, S, Z, A fed at
    run time instead of stored as initializers; function: a FunctionProto added before the stock
    body (which then is not added); x_type: element type of X and Y; op_type: ``OP_TYPE``,
    ``W8A8_OP_TYPE`` (the node is named "w4a8" or "w8a8") or ``RESCORED_OP_TYPE`` (weights also
    hold the residual's "RB", "RS", "RZ"; top_k: its attribute).
    """
    from onnx import TensorProto, helper, numpy_helper

    values = {**weights, "A": np.asarray(act_scale, np.float32)}
    names = ["X", "B", "S", "Z", "A"] + (["RB", "RS", "RZ"] if op_type == RESCORED_OP_TYPE else [])
    default_attrs = dict(K=k, N=n, group_size=group_size, act_mode=act_mode, **({} if top_k is None else {"top_k": top_k}))
    node = helper.make_node(op_type, names, ["Y"], name=op_type[:4].lower(), domain=OP_DOMAIN,
                            **(attrs if attrs is not None else default_attrs))
    dtypes = {"B": TensorProto.UINT8, "S": TensorProto.FLOAT, "Z": TensorProto.UINT8, "A": TensorProto.FLOAT,
              "RB": TensorProto.UINT8, "RS": TensorProto.FLOAT, "RZ": TensorProto.UINT8}
    leading = [f"d{i}" for i in range(x_rank - 1)]
    inputs = [helper.make_tensor_value_info("X", x_type, leading + ["k"])]
    inputs += [helper.make_tensor_value_info(name, dtypes[name], values[name].shape) for name in graph_inputs]
    graph = helper.make_graph(
        [node], "w4a8", inputs, [helper.make_tensor_value_info("Y", x_type, leading + ["n"])],
        [numpy_helper.from_array(v, name) for name, v in values.items() if name not in graph_inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if function is not None:
        model.functions.append(function)
    add_w4a8_function(model)
    return model.SerializeToString()
