"""Small value checks shared by the formats modules (private to the package)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_hw(hw: Any, name: str) -> tuple[int, int]:
    if not isinstance(hw, (list, tuple)) or len(hw) != 2 or not all(is_int(v) and v >= 0 for v in hw):
        raise ValueError(f"{name} must be two non-negative ints (height, width), got {hw!r}")
    return int(hw[0]), int(hw[1])
