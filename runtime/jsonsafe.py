"""`json_safe`: the one conversion of results to strict JSON, with one NaN policy.

Policy: a float that is NaN or infinite becomes null. Such a number means "undefined here" (a
mis-staging rate with no crop of its stage, a kappa of one class, an interval of one patient, a
parity delta of a model that returned NaN), and null is how JSON and its readers (json, pandas,
jq) say missing; a string such as "nan" would turn a number field into a string field. Files are
then written with `atomic.write_json`, which refuses any NaN left over (allow_nan=False), so a
value that bypassed this function fails loudly instead of writing JSON that strict parsers reject.

The other conversions: numpy scalars and arrays -> Python numbers and lists, tuples -> lists,
paths -> strings, dict keys -> strings; any other object -> its str() (e.g. an enum member).
"""

from __future__ import annotations

import math
import os
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` as plain JSON types, non-finite floats as None (see the module docstring)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy (and torch) scalars and arrays
        return json_safe(value.tolist())
    return str(value)
