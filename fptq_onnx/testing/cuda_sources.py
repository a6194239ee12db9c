"""The CUDA kernels' constants and variant table, read from the sources in ``custom_ops/``.

The numpy emulations check the kernels' index math with the numbers the kernels compile with, so
they read them here instead of keeping copies that could drift:

* :func:`constants`: a file's namespace-level ``constexpr`` values (``kTileK``, ``kConfigBM``,
  ...), with those of the headers it includes;
* :func:`struct_constants`: the ``static constexpr`` members of a (template) struct such as
  ``Tile<...>`` or ``Cfg<BT>`` for given template arguments (``Cfg<16>.SMEM_BYTES``);
* :func:`mma_tile_configs`: the ``ConfigTile<CFG, SG>`` specializations of ``w4a8_cuda.cu``;
* :func:`variants`: the descriptor table ``kVariants`` of ``w4a8_cuda.cu`` with the ids of
  ``w4a8_cuda.h``.

Values are C++ constant expressions of the subset these files use (integer and float literals,
names, ``+ - * / % << >> & ^ |``, comparisons, ``&& ||``, ``?:``), evaluated by :func:`evaluate`.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

# The checkout: the package's parent folder when it is imported from the source tree, else the
# working directory (tests run from the checkout's root against the installed package, which
# carries no C++ sources).
CHECKOUT = next((root for root in (Path(__file__).resolve().parents[2], Path.cwd()) if (root / "custom_ops").is_dir()),
                Path(__file__).resolve().parents[2])
CUSTOM_OPS = CHECKOUT / "custom_ops"

# ---------------------------------------------------------------------------------------------
# C++ constant expressions
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(0[xX][0-9a-fA-F]+[uU]?|\d+\.\d*(?:[eE][-+]?\d+)?[fF]?|\d+[uU]?|[A-Za-z_]\w*(?:::\w+)*"
                    r"|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%<>&^|?:()!~])")
_BINARY = {  # operator -> (precedence, function); C++'s precedence, higher binds tighter
    "||": (1, lambda a, b: int(bool(a) or bool(b))), "&&": (2, lambda a, b: int(bool(a) and bool(b))),
    "|": (3, lambda a, b: a | b), "^": (4, lambda a, b: a ^ b), "&": (5, lambda a, b: a & b),
    "==": (6, lambda a, b: int(a == b)), "!=": (6, lambda a, b: int(a != b)),
    "<": (7, lambda a, b: int(a < b)), "<=": (7, lambda a, b: int(a <= b)),
    ">": (7, lambda a, b: int(a > b)), ">=": (7, lambda a, b: int(a >= b)),
    "<<": (8, lambda a, b: a << b), ">>": (8, lambda a, b: a >> b),
    "+": (9, lambda a, b: a + b), "-": (9, lambda a, b: a - b),
    "*": (10, lambda a, b: a * b), "%": (10, lambda a, b: a % b),
    "/": (10, lambda a, b: int(a / b) if isinstance(a, int) and isinstance(b, int) else a / b),  # truncates
}


def _tokens(expr: str) -> list[str]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read the C++ expression {expr!r} at {expr[pos:]!r}")
        out.append(match.group(1))
        pos = match.end()
    return out


def evaluate(expr: str, names: dict):
    """The value of the C++ constant expression ``expr``, names looked up in ``names``.

    >>> evaluate("BT >= 128 ? 6 : (BT >= 64 ? 8 : 10)", {"BT": 64})
    8
    >>> evaluate("(OFF + 1023) / 1024 * 1024", {"OFF": 1025})
    2048
    """
    tokens = _tokens(expr)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"C++ expression {expr!r}: expected {expected or 'more'}, got {token!r}")
        pos += 1
        return token

    def atom():
        token = take()
        if token == "(":
            value = ternary()
            take(")")
            return value
        if token in ("-", "+", "!", "~"):
            value = atom()
            return {"-": -value, "+": value, "!": int(not value), "~": ~value}[token]
        if token[0].isdigit():
            text = token.rstrip("uUfF") if not token.startswith(("0x", "0X")) else token.rstrip("uU")
            return float(text) if "." in text else int(text, 0)
        if token not in names:
            raise KeyError(f"C++ expression {expr!r}: {token} is not a known constant")
        return names[token]

    def binary(min_precedence):
        left = atom()
        while peek() in _BINARY and _BINARY[peek()][0] >= min_precedence:
            precedence, function = _BINARY[take()]
            left = function(left, binary(precedence + 1))
        return left

    def ternary():
        condition = binary(1)
        if peek() != "?":
            return condition
        take("?")
        when_true = ternary()
        take(":")
        when_false = ternary()
        return when_true if condition else when_false

    value = ternary()
    if pos != len(tokens):
        raise ValueError(f"C++ expression {expr!r}: unexpected {tokens[pos]!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@functools.cache
def source(name: str) -> str:
    """The text of ``custom_ops/<name>``, comments removed (``//`` to the end of the line)."""
    path = CUSTOM_OPS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the CUDA sources come with a checkout of fptq-onnx "
                                "(run from its root)")
    return re.sub(r"//[^\n]*", "", path.read_text())


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """``text`` split at the ``separator`` characters outside parentheses and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "({"
        depth -= char in ")}"
        if char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _declare(declarators: str, names: dict, into: dict) -> None:
    """Evaluates ``A = 1, B[2] = {3, 4}`` into ``into`` (and ``names``, for the next ones)."""
    for declarator in _split_top_level(declarators):
        name, value = (part.strip() for part in declarator.split("=", 1))
        name = name.split("[")[0].strip()
        if value.startswith("{"):
            result = [evaluate(item, names) for item in _split_top_level(value.strip("{} "))]
        else:
            result = evaluate(value, names)
        names[name] = into[name] = result


_TYPES = r"(?:int|unsigned|float|double|int64_t|uint32_t|size_t)"


@functools.cache
def constants(name: str) -> dict:
    """The namespace-level ``constexpr`` values of ``custom_ops/<name>`` (declarations that start
    a line), with those of the local headers it includes first."""
    text = source(name)
    names: dict = {}
    for header in re.findall(r'^#include "([^"]+)"', text, re.M):
        names.update(constants(header))
    for declarators in re.findall(rf"^constexpr\s+{_TYPES}\s+([^;]+);", text, re.M):
        _declare(declarators, names, names)
    return names


def struct_constants(name: str, struct: str, **template_args) -> SimpleNamespace:
    """The ``static constexpr`` members of ``struct <struct>`` in ``custom_ops/<name>``, in
    order, for the given template arguments: ``struct_constants("w4a8_cuda_sm90_tma.cu", "Cfg",
    BT=16).SMEM_BYTES``."""
    text = source(name)
    match = re.search(rf"\bstruct {struct} \{{", text)
    if match is None:
        raise KeyError(f"no struct {struct} in {name}")
    depth, end = 0, match.end() - 1
    for end in range(match.end() - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    names = {**constants(name), **template_args}
    members: dict = {}
    for declarators in re.findall(rf"static constexpr\s+{_TYPES}\s+([^;]+);", text[match.end():end]):
        _declare(declarators, names, members)
    return SimpleNamespace(**members)


def one_line_function(name: str, function: str):
    """A Python callable for the C++ function ``function`` of ``custom_ops/<name>`` whose body is
    one ``return`` of a constant expression of its parameters (casts ``static_cast<T>(x)`` read
    as ``(x)``): ``one_line_function("w4a8_cuda_sm90_tma.cu", "x_desc")(saddr)``."""
    match = re.search(rf"\b{function}\(([^)]*)\)\s*\{{\s*return ([^;]+);\s*\}}", source(name))
    if match is None:
        raise KeyError(f"no one-line function {function} in {name}")
    parameters = [p.split()[-1] for p in match.group(1).split(",") if p.strip()]
    body = re.sub(r"static_cast<\w+>", "", match.group(2))
    names = constants(name)

    def call(*args):
        return evaluate(body, {**names, **dict(zip(parameters, args, strict=True))})

    return call


@functools.cache
def mma_tile_configs() -> dict[int, dict]:
    """``{config: Tile's template arguments but SG}`` from the ``ConfigTile<CFG, SG>``
    specializations of w4a8_cuda.cu (``using T = Tile<16, 128, 1, 4, 4, 4, SG>``)."""
    text, names = source("w4a8_cuda.cu"), constants("w4a8_cuda.cu")
    fields = ("BM_", "BN_", "WARPS_M_", "WARPS_N_", "STAGES_", "MIN_BLOCKS_")
    configs = {}
    for cfg, args in re.findall(r"struct ConfigTile<(\d+), SG> \{\s*using T = Tile<([^>]*), SG>;", text):
        configs[int(cfg)] = dict(zip(fields, (evaluate(arg, names) for arg in _split_top_level(args)), strict=True))
    return configs


def mma_tile(cfg: int, sg: int) -> SimpleNamespace:
    """``Tile<...>`` of ``ConfigTile<cfg, sg>``: BM, THREADS, WM, ..., SMEM_BYTES."""
    return struct_constants("w4a8_cuda.cu", "Tile", **mma_tile_configs()[cfg], SG_=sg)


# ---------------------------------------------------------------------------------------------
# The kernel variants
# ---------------------------------------------------------------------------------------------


_FLAG_NAMES = {"kPdl": "pdl", "kOverlap": "overlap", "kFusedQuant": "fused_quant"}


@dataclass(frozen=True)
class Variant:
    """One row of ``kVariants`` (w4a8_cuda.cu): ``kernel`` is ``"mma"`` or ``"tma"``; ``rows``
    the tokens per block; ``flags`` the names of its VariantFlag bits (``"pdl"``, ``"overlap"``,
    ``"fused_quant"``)."""

    id: int
    name: str
    kernel: str
    rows: int
    flags: frozenset

    @property
    def on_hopper_only(self) -> bool:
        """Needs sm_90 features (wgmma and bulk copies, or programmatic dependent launch)."""
        return self.kernel != "mma" or "pdl" in self.flags


@functools.cache
def defines(name: str) -> dict[str, int]:
    """The integer ``#define``s of ``custom_ops/<name>`` (``FPTQ_DTYPE_FLOAT16``, ...)."""
    return {macro: int(value) for macro, value in re.findall(r"^#define (\w+) \(?(-?\d+)\)?$", source(name), re.M)}


@functools.cache
def variants() -> dict[int, Variant]:
    """``{id: Variant}`` in the order of the table."""
    ids = defines("w4a8_cuda.h")
    rows = re.findall(r'\{(FPTQ_W4A8_VARIANT_\w+),\s*"(\w+)",\s*Kernel::k(\w+),\s*(\d+),\s*([\w| ]+)\}',
                      source("w4a8_cuda.cu"))
    if not rows:
        raise ValueError("no rows of kVariants found in w4a8_cuda.cu")
    table = {}
    for macro, name, kernel, block_rows, flags in rows:
        bits = frozenset(_FLAG_NAMES[f.strip()] for f in flags.split("|") if f.strip() != "0")
        table[ids[macro]] = Variant(ids[macro], name, kernel.lower(), int(block_rows), bits)
    return table


AUTO = defines("w4a8_cuda.h")["FPTQ_W4A8_VARIANT_AUTO"]


def variant_name(variant_id: int) -> str:
    """The table's name of a variant (``auto`` for AUTO, ``id N`` for an id that names none)."""
    if variant_id == AUTO:
        return "auto"
    return variants()[variant_id].name if variant_id in variants() else f"id {variant_id}"


def parse_variant_list(text: str) -> list[int]:
    """``"all"`` (AUTO and every variant) or comma-separated ids and ``auto``: ``"auto,16,17"``."""
    if text.strip() == "all":
        return [AUTO, *variants()]
    chosen = [AUTO if part.strip() == "auto" else int(part) for part in text.split(",") if part.strip()]
    unknown = [v for v in chosen if v != AUTO and v not in variants()]
    if unknown:
        raise ValueError(f"no kernel variant with id {unknown[0]} (w4a8_cuda.h names {sorted(variants())})")
    return chosen
