"""One validator per quantity, shared by the PreprocessSpec, the training configuration, the
losses and the CLI, so that a value is either accepted everywhere or refused everywhere with the
same one-line message.

Every validator returns the value in its canonical type (int or float; bools and strings are not
numbers) or raises `InvalidValue`. That is an InputError, so the CLI prints it as one line with
exit code 2, and a ValueError, so code that parses stored data (a model's metadata, a checkpoint)
can keep treating a bad value as malformed data. `name` is what the user wrote: an option such as
`--crop-size`, or a field such as `crop_size` in a JSON file.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InputError

# A crop smaller than 16 px holds no texture worth staging; 2048 is far beyond any MRI matrix.
# (VGG16 needs at least 32 px: its five poolings; that check belongs to the backbone.)
CROP_SIZE_RANGE = (16, 2048)
MARGIN_TEXT = "[0, pi/2) radians"
DEVICES = ("auto", "cpu", "cuda")


class InvalidValue(InputError, ValueError):
    """A value outside what its quantity allows."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def integer(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """An int (not a bool, not a float) with low <= value (<= high)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise InvalidValue(f"{name} must be an integer {_interval(low, high, False, False)}, got {value!r}")
    return int(value)


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, text: str | None = None) -> float:
    """A finite int or float inside the interval (bounds closed unless `*_open`), as float.

    `text` replaces the generated interval in the message (e.g. "[0, pi/2) radians").
    """
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        where = text or (_interval(low, high, low_open, high_open) if (low, high) != (None, None) else "finite")
        raise InvalidValue(f"{name} must be a number {where}, got {value!r}")
    return float(value)


def positive(value: Any, name: str) -> float:
    """A finite number > 0 (scale s, learning rate)."""
    return number(value, name, low=0.0, low_open=True)


def crop_size(value: Any, name: str = "crop_size") -> int:
    """Side of the square model crop in pixels."""
    low, high = CROP_SIZE_RANGE
    return integer(value, name, low=low, high=high)


def margin(value: Any, name: str = "margin") -> float:
    """Additive angular margin m: cos(theta + m) must stay monotone on [0, pi/2)."""
    return number(value, name, low=0.0, high=math.pi / 2, high_open=True, text=MARGIN_TEXT)


def fraction(value: Any, name: str, *, high: float = 1.0, low_open: bool = False) -> float:
    """A share of patients: [0, high) (or (0, high) with low_open)."""
    return number(value, name, low=0.0, high=high, low_open=low_open, high_open=True)


def device(value: Any, name: str = "--device") -> str:
    """auto, cpu, cuda or cuda:N (lower case)."""
    text = str(value).strip().lower()
    if text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise InvalidValue(f"{name} must be auto, cpu or cuda, got {value!r}")
