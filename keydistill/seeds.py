"""Runs repeated over seeds: each figure's mean and standard deviation, and how a table shows them."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof=1: the spread a new seed may show); sd is 0 for one
    value. NaN for no values."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def aggregate(per_seed: list[dict], keys: Iterable[str]) -> dict[str, dict]:
    """{key: {"mean", "sd", "seeds"}} over the per-seed results, for each key; a value of None in any seed
    (a figure that does not apply) aggregates to None."""
    out = {}
    for key in keys:
        values = [result[key] for result in per_seed]
        if any(v is None for v in values):
            out[key] = None
            continue
        mean, sd = mean_sd(values)
        out[key] = {"mean": mean, "sd": sd, "seeds": values}
    return out


def shown(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """A figure as a table cell: "89.4 ± 0.3" over several seeds, "89.4" for one, "n/a" when missing."""
    if stat is None:
        return "n/a"
    mean = f"{scale * stat['mean']:.{digits}f}"
    return mean if len(stat["seeds"]) == 1 else f"{mean} ± {scale * stat['sd']:.{digits}f}"
