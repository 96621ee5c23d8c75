"""runtime.jsonsafe.json_safe: the one conversion to strict JSON, NaN and infinities as null."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

from liverstage.runtime.atomic import write_json
from liverstage.runtime.jsonsafe import json_safe


class _Kind(Enum):
    A = "a"


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere(tmp_path):
    value = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "np": np.float32("nan"), "ok": 0.25,
             "nested": [{"x": (1.0, math.nan)}], 3: np.array([1.5, np.inf]), "i": np.int64(7), "b": np.bool_(True)}
    safe = json_safe(value)
    assert safe == {"nan": None, "inf": None, "ninf": None, "np": None, "ok": 0.25, "nested": [{"x": [1.0, None]}],
                    "3": [1.5, None], "i": 7, "b": True}
    assert type(safe["i"]) is int and type(safe["b"]) is bool
    write_json(tmp_path / "x.json", safe)
    assert _strict((tmp_path / "x.json").read_text()) == safe


def test_paths_and_other_objects_become_strings():
    assert json_safe({"p": Path("/a/b"), "k": _Kind.A, "s": "text", "n": None}) == {
        "p": "/a/b", "k": "_Kind.A", "s": "text", "n": None}


def test_a_nan_that_skipped_it_is_refused_by_write_json(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "y.json", {"x": math.nan})
    assert not (tmp_path / "y.json").exists()
