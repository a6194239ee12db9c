"""One config: every ConvertConfig / CalibrationConfig field is a flag of ``fptq-onnx convert``
and every convert option a field, with the dataclass's defaults and validation."""
import argparse
import dataclasses

import pytest

from fptq_onnx.cli import build_parser, config_from_args
from fptq_onnx.config import CalibrationConfig, ConvertConfig, flag_of
from fptq_onnx.errors import UserError

COMMAND_OPTIONS = {"-h", "--help", "--calib", "-o", "--output", "--dump-passes", "--report"}  # convert's own


def convert_parser() -> argparse.ArgumentParser:
    [commands] = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices["convert"]


def parse(*options: str) -> ConvertConfig:
    return config_from_args(build_parser().parse_args(["convert", "m.onnx", "--calib", "c.txt", "-o", "o.onnx",
                                                       *options]))


def test_every_field_is_a_flag_and_every_flag_a_field():
    flags = {flag for action in convert_parser()._actions for flag in action.option_strings}
    fields = [field for config in (ConvertConfig, CalibrationConfig) for field in dataclasses.fields(config)
              if field.name != "calibration"]
    assert {flag_of(field) for field in fields} <= flags
    negated = {f"--no-{flag[2:]}" for flag in flags}  # the --no- half of a boolean pair
    assert flags - COMMAND_OPTIONS - negated == {flag_of(field) for field in fields}


def test_no_flags_give_the_dataclass_defaults():
    assert parse() == ConvertConfig()


@pytest.mark.parametrize("options, fields", [
    pytest.param(["--w8-layers", "3"], dict(w8_layers=3, w8_fraction=0.0), id="w8-count"),
    pytest.param(["--w8-layers", "25%"], dict(w8_layers=0, w8_fraction=0.25), id="w8-percent"),
    pytest.param(["--no-lae-fold", "--symmetric"], dict(fold_lae=False, symmetric=True), id="booleans"),
    pytest.param(["--lm-head", "float", "--lae-bands", "none"], dict(lm_head="float", lae_bands=()), id="head"),
    pytest.param(["--gptq-damp", "0.05", "--auto-tolerance", "0.1"], dict(gptq_damp=0.05, auto_tolerance=0.1),
                 id="once-without-flags"),
])
def test_flags_set_their_fields(options, fields):
    assert parse(*options) == ConvertConfig(**fields)


def test_calibration_flags_set_the_calibration_config():
    config = parse("--samples", "4", "--calib-seq-lens", "32,64", "--calib-seed", "7")
    assert config.calibration == CalibrationConfig(samples=4, seq_lens=(32, 64), seed=7)


def test_the_demo_takes_its_own_sample_count():
    args = build_parser().parse_args(["demo"])
    assert args.samples == 32 and build_parser().parse_args(["demo", "--samples", "8"]).samples == 8


def test_lm_head_spellings():
    assert ConvertConfig().lm_head == "auto" and not ConvertConfig().exclude_lm_head
    assert ConvertConfig(lm_head="float").exclude_lm_head
    assert [ConvertConfig().auto_lm_head(share) for share in (0.21, 0.63)] == ["w8", "rescored"]
    with pytest.raises(UserError, match="--lm-head takes auto, w8, w4, rescored, float, got 'w2'"):
        ConvertConfig(lm_head="w2")
    with pytest.raises(UserError, match="--lm-head-top-k must be >= 1, got 0"):
        ConvertConfig(lm_head="rescored", lm_head_top_k=0)
