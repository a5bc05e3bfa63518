"""An evaluation as a person reads it: a few lines of text, or a small HTML table in a notebook.

``Evaluation`` is the dict ``evaluate_predictions`` builds (so ``--json`` and every reader of the
keys are unchanged) that prints as a summary instead of a 4 KB dict; ``RunResult`` and
``pneumo.evaluate_model`` use ``metrics_lines`` and ``metrics_html``.
"""

from __future__ import annotations

import html
from typing import Any

HEADLINE = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc")


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95 % interval) for the headline metrics present in ``report``."""
    m, ci = report.get("metrics") or {}, report.get("ci") or {}
    rows = []
    for key in HEADLINE:
        if m.get(key) is None:
            continue
        fmt = (lambda v: f"{v:.3f}") if key == "roc_auc" else _pct
        interval = ci.get(key)
        rows.append((key, fmt(m[key]), f"{fmt(interval[0])} - {fmt(interval[1])}" if interval else ""))
    return rows


def headline(report: dict[str, Any]) -> str:
    """One line: what was evaluated, on how many images, at which threshold."""
    m = report.get("metrics") or {}
    n = m.get("n", report.get("n", "?"))
    subset = report.get("evaluated_on") or "validation"
    rule = ""
    if report.get("threshold") is not None and report.get("positive_class"):
        pos = report["positive_class"]
        rule = f", {pos} when p({pos}) \u2265 {_pct(report['threshold'])}"
    return f"{subset}: {n} images{rule}"


def metrics_lines(report: dict[str, Any]) -> list[str]:
    lines = [headline(report)]
    lines += [f"  {k:<12} {v:>8}" + (f"  (95% CI {ci})" if ci else "") for k, v, ci in metric_rows(report)]
    if report.get("confusion_matrix") is not None:
        lines.append(
            f"  confusion    {report['confusion_matrix']} (rows actual, columns predicted: "
            f"{', '.join(report.get('classes') or [])})"
        )
    return lines


def metrics_html(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{v}</td><td>{ci}</td></tr>"
        for k, v, ci in metric_rows(report)
    )
    return (
        f"<p><b>{html.escape(headline(report))}</b></p>"
        f"<table><tr><th>metric</th><th>value</th><th>95% interval</th></tr>{rows}</table>"
    )


class Evaluation(dict):
    """An evaluation report (the dict ``--json`` prints) that reads as a summary in a REPL or notebook."""

    def __repr__(self) -> str:
        return "Evaluation(" + "\n".join(metrics_lines(self)) + ")"

    def _repr_html_(self) -> str:
        return metrics_html(self)
