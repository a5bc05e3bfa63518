"""The decision rule, owned here and nowhere else.

A two-class model calls the positive class when p(positive) reaches its stored threshold; any other
model takes the most probable class. The threshold is chosen on validation by a named rule
(``youden``, ``sensitivity:0.95``, ``specificity:0.95``, ``fixed:0.5``), parsed here so that a typo is refused when a
training run is configured, not after its last epoch.
"""

from __future__ import annotations

import numpy as np

from pneumo.errors import PneumoError

THRESHOLD_METHODS = (
    "'youden', 'sensitivity:<target in (0,1]>' (e.g. 'sensitivity:0.95'), "
    "'specificity:<target in (0,1]>' (e.g. 'specificity:0.95') or 'fixed:<threshold in [0,1]>' (e.g. 'fixed:0.5')"
)
TARGETS = ("sensitivity", "specificity")
# The rule `pneumo train` and `pneumo ensemble` choose a threshold by unless told otherwise. Measured on
# outside-dev films (issue 26, bench/outside_thresholds.py, rule written before the runs): over five
# runs, youden's validation threshold read the outside films at mean balanced accuracy 0.796
# (sensitivity 0.990, specificity 0.602), sensitivity:0.95's at 0.834 (0.979, 0.690).
DEFAULT_THRESHOLD_RULE = "sensitivity:0.95"


def parse_threshold_method(method: str) -> tuple[str, float | None]:
    """``'youden'`` -> (youden, None); ``'specificity:0.95'`` / ``'fixed:0.5'`` -> (kind, value)."""
    kind, sep, arg = str(method).strip().lower().partition(":")
    if kind == "youden" and not sep:
        return kind, None
    if kind not in (*TARGETS, "fixed") or not arg:
        raise PneumoError(f"unknown threshold method {method!r}: use {THRESHOLD_METHODS}")
    try:
        value = float(arg)
    except ValueError:
        raise PneumoError(f"threshold method {method!r}: {arg!r} is not a number") from None
    if kind == "fixed" and not 0.0 <= value <= 1.0:
        raise PneumoError(f"threshold method {method!r}: the fixed threshold must lie in [0, 1]")
    if kind in TARGETS and not 0.0 < value <= 1.0:
        raise PneumoError(f"threshold method {method!r}: the target {kind} must lie in (0, 1]")
    return kind, value


def decide(probs: np.ndarray, positive: int | None, threshold: float | None) -> np.ndarray:
    """Class indices for probabilities ``(N, K)``: the threshold on p(positive) when the model is
    binary with a positive class, else argmax. ``probs`` must be exactly what the model gave (the
    run folder stores them at full precision, so a reader re-deciding gets the model's answer)."""
    probs = np.asarray(probs)
    if positive is not None and threshold is not None and probs.shape[1] == 2:
        return np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return probs.argmax(axis=1)


def describe_reading(probs: np.ndarray, classes: list[str], positive: int | None, threshold: float | None) -> str:
    """One film's decision in words, with the one meaning of probability pneumo uses everywhere:
    p(positive class) against the threshold ("p(PNEUMONIA) 68.6 %: below the 76.4 % needed to call
    PNEUMONIA"); a model without a threshold names its most probable class."""
    probs = np.asarray(probs, dtype=float)
    if positive is not None and threshold is not None and len(probs) == 2:
        p, name = float(probs[positive]), classes[positive]
        side = "at or above" if p >= threshold else "below"
        return f"p({name}) {100 * p:.1f} %: {side} the {100 * threshold:.1f} % needed to call {name}"
    top = int(probs.argmax())
    return f"{classes[top]} is the most probable class ({100 * float(probs[top]):.1f} %)"


def describe_rule(classes: list[str], positive: int | None, threshold: float | None) -> str:
    """The decision rule in words: "PNEUMONIA when p(PNEUMONIA) >= 76.4 %"."""
    if positive is None or threshold is None:
        return "the most probable class wins"
    return f"{classes[positive]} when p({classes[positive]}) \u2265 {100 * threshold:.1f} %"
