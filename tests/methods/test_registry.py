"""The registry: metadata for every method, `methods=` parsing, stage order, one-line refusals; the doctests."""
import dataclasses
import doctest
import importlib

import pytest

from hasten.errors import HastenError
from hasten.methods import METHODS, build_methods, method_table, parse_methods
from hasten.methods.registry import DOMAINS
from hasten.tasks.digits import TASK as DIGITS

REQUIRED = {"label_smoothing", "mixup", "cutmix", "blurpool", "channels_last", "progressive_resizing", "ema",
            "layer_freezing", "selective_backprop", "stochastic_depth", "seq_len_warmup", "sam", "gradient_clipping",
            "sortagrad", "swish", "mask_schedule", "fgsm", "pgd"}


def test_every_required_method_is_registered_with_metadata():
    assert REQUIRED <= set(METHODS)
    for row in method_table():
        assert row["summary"] and row["citation"] and row["effect"] and row["domain"] in DOMAINS
        assert set(row["conflicts"]) <= set(METHODS)
    for info in METHODS.values():
        assert dataclasses.is_dataclass(info.cls) and info.cls.name == f"method:{info.name}"


def test_parse_methods():
    assert parse_methods("mixup:alpha=0.4, ema,,sam:rho=0.1:interval=2") == [
        ("mixup", ["alpha=0.4"]), ("ema", []), ("sam", ["rho=0.1", "interval=2"])]
    assert parse_methods("") == []


def test_build_methods_orders_by_stage_and_types_options():
    a = build_methods("ema,label_smoothing:alpha=0.25", DIGITS, None)
    b = build_methods("label_smoothing:alpha=0.25,ema", DIGITS, None)
    assert [type(m).__name__ for m in a] == [type(m).__name__ for m in b] == ["LabelSmoothing", "EMA"]
    assert a[0].alpha == 0.25 and isinstance(a[0].alpha, float)


@pytest.mark.parametrize("spec,words", [
    ("mixupp", "did you mean mixup"),
    ("ema,ema", "listed twice"),
    ("mixup,cutmix", "cannot be combined"),
    ("ema:decay=0.9", "unknown key 'decay'"),
    ("sam:rho=big", "expected a number"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(HastenError, match=words) as err:
        build_methods(spec, DIGITS, DIGITS.make_model())
    assert "\n" not in str(err.value)


def test_a_method_that_cannot_apply_says_why_in_one_line():
    model = DIGITS.make_model()
    for name in ("blurpool", "channels_last", "cutmix", "progressive_resizing", "stochastic_depth",
                 "seq_len_warmup", "mask_schedule"):
        with pytest.raises(HastenError, match=f"{name} cannot apply to task 'digits': ") as err:
            build_methods(name, DIGITS, model)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("module", ["registry", "labels", "vision", "weights", "model", "data", "adversarial", "tradeoff"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(f"hasten.methods.{module}"))
    assert result.failed == 0 and result.attempted > 0
