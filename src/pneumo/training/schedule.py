"""Pure learning-rate schedules: functions of the position in training, nothing stateful.

``one_cycle`` is Smith's policy as fastai runs it: a cosine warm-up from ``lr / div`` to ``lr`` over
the first ``pct_start`` of training, then a cosine anneal to ``lr / div_final``, with momentum
(Adam's beta1) moving the opposite way.
"""

from __future__ import annotations

import math


def cosine(start: float, end: float, pos: float) -> float:
    """Cosine interpolation from ``start`` (pos 0) to ``end`` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def exponential(start: float, end: float, pos: float) -> float:
    """Geometric interpolation: the LR range test's ramp."""
    return start * (end / start) ** pos


def one_cycle(pos: float, lr_max: float, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5) -> float:
    """Learning rate at ``pos`` in [0, 1] of a one-cycle run."""
    if pos < pct_start:
        return cosine(lr_max / div, lr_max, pos / pct_start)
    return cosine(lr_max, lr_max / div_final, (pos - pct_start) / (1 - pct_start))


def one_cycle_momentum(
    pos: float, moms: tuple[float, float, float] = (0.95, 0.85, 0.95), pct_start: float = 0.25
) -> float:
    """Momentum at ``pos``: high while the LR is low, low at the LR peak."""
    if pos < pct_start:
        return cosine(moms[0], moms[1], pos / pct_start)
    return cosine(moms[1], moms[2], (pos - pct_start) / (1 - pct_start))


def discriminative_lrs(lr_max: float, n_groups: int, spread: float = 100.0) -> list[float]:
    """fastai's ``slice(lr / spread, lr)``: geometric LRs from the first layer group to the head."""
    if n_groups == 1:
        return [lr_max]
    return [lr_max / spread * spread ** (i / (n_groups - 1)) for i in range(n_groups)]
