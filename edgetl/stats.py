"""How sure an accuracy figure is: the Wilson score interval of a proportion.

Framework-free: the fine-tuning summary, the benchmarks and the reports all quote top-1 with the same
interval, so a figure on 50 test images is never read as if it were measured on 5,000.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of correct / total; (0, 1) when nothing was measured."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width(total: int, p: float = 0.5) -> float:
    """Half the width of the interval at accuracy p: what 'a few points apart' means on `total` images."""
    low, high = wilson_interval(round(p * total), total)
    return (high - low) / 2
