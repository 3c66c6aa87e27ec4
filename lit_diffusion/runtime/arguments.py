"""Types for command-line options: numbers that make sense, refused naming the option otherwise (argparse adds the
option's name to the message)."""

from __future__ import annotations

import argparse
import math


def comma_floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,3,5, got {text!r}")
    return values


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def number_at_least(low: float):
    """A finite number >= low (eta, a scale)."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low:g}, got {text!r}")
        return value
    return parse


def whole_number(low: int):
    """A whole number >= low: 1 for a count of samples, steps or images, 0 where none is a choice."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value
    return parse


positive_count = whole_number(1)  # a count of samples, steps, images, ...
