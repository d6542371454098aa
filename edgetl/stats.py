"""How sure an accuracy figure is: the Wilson score interval of a proportion.

Framework-free: the fine-tuning summary, the benchmarks and the reports all quote top-1 with the same
interval, so a figure on 50 test images is never read as if it were measured on 5,000.
"""

from __future__ import annotations


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of correct / total (scipy's); (0, 1) when nothing was measured."""
    if total <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    interval = binomtest(int(correct), int(total)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def half_width(total: int, p: float = 0.5) -> float:
    """Half the width of the interval at accuracy p: what 'a few points apart' means on `total` images."""
    low, high = wilson_interval(round(p * total), total)
    return (high - low) / 2
