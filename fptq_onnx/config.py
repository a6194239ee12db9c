"""Every setting of a conversion: :class:`ConvertConfig` and its :class:`CalibrationConfig`,
validated once, in ``__post_init__``, and passed down explicitly.

Each field is an :func:`option`: its default, its help text and how its command-line flag parses,
from which ``fptq-onnx convert`` builds its options (``cli.add_config_options``). A new setting
is one field here.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Callable

from .errors import UserError

BANDS = ("low", "mid", "high")
# 8-bit weights, 4-bit, 4-bit + residual on top-k, float; auto: w8 or rescored by the head's share
LM_HEAD_CHOICES = ("auto", "w8", "w4", "rescored", "float")
# --lm-head auto takes "rescored" when the head holds more than this share of the quantized
# weights: decode reads them all once per token, so there the head's bytes are most of a
# token's (Gemma-3-270m: 63%; SmolLM2-135M: 21%, where w8 is kept)
AUTO_RESCORED_SHARE = 0.5
ACCURACY_GROUP = "accuracy options (defaults chosen by measurement, docs/accuracy.md)"


def option(default: Any, help: str | None, *, flag: str | None = None, accuracy: bool = False,
           to_fields: Callable[[Any], dict] | None = None, shown: Callable[[Any], str] | None = None,
           **argparse_kwargs) -> Any:
    """A config field and its flag.

    ``help``: the flag's help, "(default ...)" appended (None: the field is set by another field's
    flag, ``flag`` names it); ``flag``: its spelling where not ``--field-name``; ``accuracy``: listed
    under :data:`ACCURACY_GROUP`; ``to_fields``: ``value -> {field: value}`` for a flag setting
    several fields; ``shown``: ``config -> default text``; ``argparse_kwargs``: type, choices,
    metavar (a bool field is a ``--flag/--no-flag`` pair).
    """
    metadata = dict(help=help, flag=flag, accuracy=accuracy, to_fields=to_fields, shown=shown,
                    argparse=argparse_kwargs)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def comma_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def band_list(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(part.strip() for part in text.split(",") if part.strip())


def count_or_percent(text: str) -> tuple[int, float]:
    """``"10"`` -> (10, 0.0), ``"12%"`` -> (0, 0.12): a layer count or a share of the weights."""
    try:
        return (0, float(text[:-1]) / 100) if text.endswith("%") else (int(text), 0.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a percentage like 5%, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How to draw calibration samples from text (ignored for .npz and protobuf folders)."""

    samples: int = option(128, "calibration sequences cut from a text file")
    seq_len: int = option(512, "tokens per calibration sequence")
    tokenizer: str | None = option(None, "folder with tokenizer.json (default: beside the model)")
    error_rows: int = option(256, "calibration rows sampled per layer input to measure each layer's output "
                                  "error; 0: none")
    seed: int = option(0, "seed of that row sampling, so a conversion is reproducible", flag="--calib-seed")
    # SLAC (sequence-length-aware calibration): window lengths cycled over the samples, e.g.
    # (64, 128, 512) to match a target task's lengths; None: every window is seq_len long
    seq_lens: tuple[int, ...] | None = option(
        None, "SLAC: calibration sequence lengths, cycled over the samples, to match the target task's lengths "
              "(default: all --seq-len)", flag="--calib-seq-lens", type=comma_ints, metavar="L1,L2,...")

    def __post_init__(self):
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.samples}")
        if self.error_rows < 0:
            raise UserError(f"--error-rows must be >= 0, got {self.error_rows}")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.seq_lens is not None and (not self.seq_lens or min(self.seq_lens) < 2):
            raise UserError(f"--calib-seq-lens needs lengths >= 2, got {list(self.seq_lens)}")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Every setting of a conversion, validated once here and passed down explicitly."""

    v0: float = option(15.0, "max|x| below which a layer uses per-tensor static int8")
    v1: float = option(150.0, "max|x| above which a layer uses per-token dynamic int8; in between: LAE + "
                              "per-tensor static")
    group_size: int = option(128, "weights per 4-bit group along K")
    # asymmetric weights measured better on SmolLM2 and Gemma-3
    symmetric: bool = option(False, "symmetric weights (zero point 8) instead of asymmetric")
    nodes_to_exclude: str | None = option(None, "leave layers whose name matches in float", metavar="REGEX")
    # The head is quantized (an fp32 head was 113 of 185 MB of SmolLM2) at 8 bits: a 4-bit head
    # took SmolLM2's Brown perplexity from 49.9 to 65.7. Where the head is most of the weights
    # (Gemma-3-270m), auto rescores it: Brown 32.36 against 32.33 with 8 bits, decode 1.31x ORT's
    # int4 block 128 (docs/accuracy.md, docs/performance.md "Session 11"); top-k 256 against 1024:
    # 33.48 against 33.25 (with LAE) at 2.16x against 2.02x the block-128 model's prefill speed
    lm_head: str = option("auto", "the language-model head: 8-bit weights (a tied embedding then reads them), "
                                  "4-bit, rescored (4-bit, plus a 4-bit residual on each token's --lm-head-top-k "
                                  "largest logits: a token reads 4 bits per weight, the logits that count get 8), "
                                  "left in float, or auto: rescored where the head is more than half of the "
                                  "model's weights, else w8", choices=LM_HEAD_CHOICES)
    lm_head_top_k: int = option(256, "with --lm-head rescored: logits per token that get the residual", accuracy=True)
    fold_lae: bool = option(True, "fold LAE's 1/s into the preceding norm where possible, else a Mul node",
                            flag="--lae-fold")
    # bands whose groups get equalization scales (the paper: only "mid"; every band measured
    # better on SmolLM2 and Gemma-3, docs/accuracy.md); the band still picks static vs dynamic
    lae_bands: tuple[str, ...] = option(BANDS, "bands whose layers get LAE scales: any of low,mid,high, or none "
                                               "(the paper: mid)", accuracy=True, type=band_list, metavar="BANDS")
    equalization: str = option("lae", "equalization scales: FPTQ's log scales, or SmoothQuant's "
                                      "max|X|^a / max|W|^(1-a)", accuracy=True, choices=("lae", "smoothquant"))
    sq_alpha: float = option(0.5, "SmoothQuant's alpha (migration strength) with --equalization smoothquant",
                             accuracy=True)
    weight_clip: str = option("output", "per-group weight clipping searched to minimize the layer's output error; "
                                        "none: the full range", accuracy=True, choices=("none", "output"))
    gptq: bool = option(False, "GPTQ weight rounding with the calibration Hessian X^T X (measured worse)",
                        accuracy=True)
    gptq_damp: float = option(0.01, "GPTQ's dampening, a fraction of the Hessian's mean diagonal", accuracy=True)
    auto_thresholds: bool = option(False, "choose v0/v1 for this model by measured output error instead of "
                                          "--v0/--v1", accuracy=True)
    auto_tolerance: float = option(0.02, "with --auto-thresholds: accept a total output error this much above "
                                         "the minimum for fewer dynamic layers", accuracy=True)
    # Mixed precision: this many most sensitive layers keep 8-bit weights (W8A8), or as many as
    # fit in w8_fraction of the other quantized weights (the head, 8-bit already, is outside it).
    # Default 3%: decode reads every 8-bit layer's weights twice over, and in onnxruntime-genai
    # (2 threads, docs/performance.md "Session 8") SmolLM2-135M decodes at 198.6-214.2 tok/s with
    # 3% against 175.8-176.4 with 12% (0%: 199.3), Brown perplexity 47.45 against 46.49 (0%:
    # 48.00; the builder's int4 block-128 model: 64.60); Gemma-3-270m 63.6 against 58.8 tok/s,
    # Brown 32.15 against 30.93 (0%: 33.14; ORT's int4 block 128: 49.11). 3% of the weights are
    # SmolLM2's 3 most sensitive down_proj layers.
    w8_layers: int = option(0, "mixed precision: keep the N layers with the largest output error (or those "
                               "within P% of the weights) at 8-bit weights; 0: all 4-bit", accuracy=True,
                            type=count_or_percent, metavar="N|P%",
                            to_fields=lambda budget: dict(w8_layers=budget[0], w8_fraction=budget[1]),
                            shown=lambda config: f"{config.w8_fraction:.0%}" if config.w8_fraction
                            else str(config.w8_layers))
    w8_fraction: float = option(0.03, None, flag="--w8-layers")
    # one group over all of K lets the AMX kernel fold its int32 sums into float once per output
    # instead of once per group (docs/performance.md "Session 8": the fold is what keeps 8-bit
    # layers behind MatMulInteger at M >= 16). Measured in onnxruntime-genai ("Session 9"): SmolLM2
    # decodes at 310.4 / 200.9 tok/s against 293.1 / 187.0 (2 / 1 threads), prefills 512 tokens in
    # 300 / 552 ms against 308 / 606, Brown 47.74 against 47.45; Gemma-3 ("Session 11") the same
    # speeds within noise, Brown 32.33 against 32.15, 5 MB smaller
    w8_per_channel: bool = option(True, "8-bit layers and head with one scale and zero point per output "
                                         "channel (all of K) instead of groups of --group-size", accuracy=True)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if not 0 < self.v0 <= self.v1:
            raise UserError(f"need 0 < --v0 <= --v1, got {self.v0} and {self.v1}")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"--group-size must be an even number >= 2, got {self.group_size}")
        if self.nodes_to_exclude:
            try:
                re.compile(self.nodes_to_exclude)
            except re.error as error:
                raise UserError(f"--nodes-to-exclude is not a valid regular expression: {error}") from None
        if self.lm_head not in LM_HEAD_CHOICES:
            raise UserError(f"--lm-head takes {', '.join(LM_HEAD_CHOICES)}, got {self.lm_head!r}")
        if self.lm_head_top_k < 1:
            raise UserError(f"--lm-head-top-k must be >= 1, got {self.lm_head_top_k}")
        unknown = set(self.lae_bands) - set(BANDS)
        if unknown:
            raise UserError(f"--lae-bands takes low, mid, high; got {', '.join(sorted(unknown))}")
        if self.equalization not in ("lae", "smoothquant"):
            raise UserError(f"--equalization is lae or smoothquant, got {self.equalization!r}")
        if not 0 <= self.sq_alpha <= 1:
            raise UserError(f"--sq-alpha must be in [0, 1], got {self.sq_alpha}")
        if self.weight_clip not in ("none", "output"):
            raise UserError(f"--weight-clip is none or output, got {self.weight_clip!r}")
        if not 0 < self.gptq_damp < 1:
            raise UserError(f"--gptq-damp must be in (0, 1), got {self.gptq_damp}")
        if self.w8_layers < 0 or not 0 <= self.w8_fraction <= 1:
            raise UserError(f"--w8-layers takes a count >= 0 or a percentage, got {self.w8_layers} / {self.w8_fraction}")
        needs_rows = [flag for flag, on in (("--auto-thresholds", self.auto_thresholds),
                                            ("--w8-layers", self.w8_layers or self.w8_fraction)) if on]
        if needs_rows and not self.calibration.error_rows:
            raise UserError(f"{needs_rows[0]} measures output errors: it needs --error-rows > 0 "
                            "(mixed precision is on by default: --w8-layers 0 turns it off)")
        if self.auto_tolerance < 0:
            raise UserError(f"--auto-tolerance must be >= 0, got {self.auto_tolerance}")

    @property
    def exclude_lm_head(self) -> bool:
        return self.lm_head == "float"

    def auto_lm_head(self, head_share: float) -> str:
        """``--lm-head auto``'s choice for a head holding ``head_share`` of the quantized weights."""
        return "rescored" if head_share > AUTO_RESCORED_SHARE else "w8"

    @property
    def hessian_kind(self) -> str:
        """What calibration must accumulate of ``X^T X`` per layer input: GPTQ needs all of it,
        clipping its diagonal group blocks (``calibration.SecondMoment``)."""
        return "full" if self.gptq else "blocks" if self.weight_clip == "output" else "none"
