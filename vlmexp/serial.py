"""Values as JSON can hold them: one conversion for per-item results, lm-eval's values and
logged artifacts.

Example:
    >>> json_safe({"a": (1.5, float("nan")), 2: None})
    {'a': [1.5, None], '2': None}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def json_safe(value: Any) -> Any:
    """Mappings (string keys) and sequences as dicts and lists, numpy/torch numbers and arrays
    as Python's, NaN and inf as None (JSON has none), any other leaf as its string."""
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)
