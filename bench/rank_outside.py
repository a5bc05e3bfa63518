"""Rank every bench/outside.py record in a folder by issue 26's rule (recipe_experiments.OUTSIDE_RULE).

    python bench/rank_outside.py bench/results/outside

Prints the ranking as JSON and writes FOLDER/ranking.md: one row per candidate, its outside-dev figures
plain and adapted and its JPEG-90 flip rate, best first. Every record stays on the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipe_experiments import OUTSIDE_RULE, outside_key  # bench/, beside this script


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.stem != "ranking"}
    order = sorted(records, key=lambda n: outside_key(records[n]), reverse=True)
    lines = [
        "# Candidates on outside-dev",
        "",
        f"Rule, written before the runs: {OUTSIDE_RULE}. Percentages; AUC of the plain reading.",
        "",
        "| rank | candidate | AUC | accuracy | sensitivity | specificity | balanced | adapted: accuracy | "
        "adapted: specificity | JPEG-90 flips |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, name in enumerate(order, 1):
        r = records[name]
        p, a = r["plain"]["metrics"], r.get("adapted", {}).get("metrics", {})
        flips = r.get("consistency", {}).get("jpeg90", {}).get("flip_rate")
        pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
        lines.append(
            f"| {i} | {name} | {p['roc_auc']:.3f} | {pct(p['accuracy'])} | {pct(p['sensitivity'])} | "
            f"{pct(p['specificity'])} | {pct(p['balanced_accuracy'])} | {pct(a.get('accuracy'))} | "
            f"{pct(a.get('specificity'))} | {pct(flips)} |"
        )
    (folder / "ranking.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"rule": OUTSIDE_RULE, "ranking": order, "winner": order[0] if order else None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
