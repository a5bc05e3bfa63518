"""What ``pneumo compare`` shows: three figures, the time-to-target table (CSV, markdown) and the report.

The figures plot validation error against epochs, wall time and training-set size, from the run
records of ``pneumo.compare.experiment`` (dicts with arch, arm, fraction, seed, n_train, history rows with
error_rate and wall_s). One line per (arch, arm): the mean over seeds, with a band from the minimum
to the maximum over seeds. Pretrained lines are solid, scratch lines dashed;
colours follow pneumo.plots' Okabe-Ito palette (blue pretrained, vermillion scratch for the first
architecture).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axis import Axis
from matplotlib.ticker import LogFormatter

from pneumo.compare.summary import by_method, fmt_pct, fmt_secs
from pneumo.errors import PneumoError
from pneumo.io_utils import atomic_write_json, atomic_write_text
from pneumo.plots import BLUE, GREEN, GREY, ORANGE, PURPLE, SKY, VERMILLION, YELLOW, save_figure, subplots

PALETTE = [BLUE, VERMILLION, GREEN, ORANGE, SKY, PURPLE, YELLOW, GREY]
TABLE_FIELDS = [
    "fraction",
    "n_train",
    "arch",
    "arm",
    "seeds",
    "final_error",
    "final_error_sd",
    "best_error",
    "roc_auc",
    "train_s",
    "target_error",
    "reached",
    "time_to_target_s",
    "epochs_to_target",
    "budget_s",
    "error_at_budget",
]


def plain_log(axis: Axis) -> None:
    """Label a log axis 3, 5, 20, 100 rather than 3x10^0: seconds read better as plain numbers."""
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))


def style(index: int, arm: str) -> dict:
    return {"color": PALETTE[index % len(PALETTE)], "ls": "-" if arm == "pretrained" else "--"}


def curves(runs: Sequence[dict], key: str) -> np.ndarray:
    """(seeds, epochs) array of ``key``, NaN-padded where a run has fewer epochs."""
    longest = max(len(r["history"]) for r in runs)
    out = np.full((len(runs), longest), np.nan)
    for i, r in enumerate(runs):
        out[i, : len(r["history"])] = [row[key] for row in r["history"]]
    return out


def _panels(fractions: Sequence[float]):
    ncols = min(3, len(fractions))
    nrows = math.ceil(len(fractions) / ncols)
    fig, axes = subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False, sharey=True)
    for ax in axes.ravel()[len(fractions) :]:
        ax.axis("off")
    return fig, list(axes.ravel())


def _label(arch: str, arm: str, several_archs: bool) -> str:
    return f"{arch} {arm}" if several_archs else arm


def methods(records: Sequence[dict]) -> dict[tuple[str, str], dict[float, list[dict]]]:
    if not records:
        raise PneumoError("no finished runs to plot")
    return by_method(records)


def _per_fraction(
    records: Sequence[dict],
    path: str | Path,
    x_key: str | None,
    xlabel: str,
    title: str,
    targets: dict[float, float] | None = None,
) -> Path:
    groups = methods(records)
    fractions = sorted({r["fraction"] for r in records})
    several = len({a for a, _ in groups}) > 1
    fig, axes = _panels(fractions)
    for ax, f in zip(axes, fractions):
        n = None
        for i, ((arch, arm), by_f) in enumerate(groups.items()):
            runs = by_f.get(f)
            if not runs:
                continue
            n = n or round(float(np.mean([r["n_train"] for r in runs])))
            err = 100 * curves(runs, "error_rate")
            x = np.nanmean(curves(runs, x_key), axis=0) if x_key else np.arange(1, err.shape[1] + 1)
            st = style(i, arm)
            ax.plot(x, np.nanmean(err, axis=0), marker="o", ms=3, lw=1.6, label=_label(arch, arm, several), **st)
            if len(runs) > 1:
                ax.fill_between(x, np.nanmin(err, axis=0), np.nanmax(err, axis=0), color=st["color"], alpha=0.18, lw=0)
        if targets and f in targets:
            ax.axhline(100 * targets[f], color=GREY, ls=":", lw=1.2, label=f"target {100 * targets[f]:.1f}%")
        if x_key:
            ax.set_xscale("log")
            plain_log(ax.xaxis)
        ax.set_title(f"{100 * f:g}% of patients (n={n} images)", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if not x_key:
            ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[:: min(3, len(fractions))]:
        ax.set_ylabel("validation error (%)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_vs_epoch(records: Sequence[dict], path: str | Path) -> Path:
    """Validation error after each epoch, one panel per training-set size."""
    return _per_fraction(records, path, None, "epoch", "Validation error per epoch: pretrained vs from scratch")


def plot_error_vs_time(records: Sequence[dict], path: str | Path, targets: dict[float, float] | None = None) -> Path:
    """Validation error against cumulative wall time (setup included; log axis), target errors dotted."""
    return _per_fraction(
        records, path, "wall_s", "wall time (s, log scale)", "Validation error against training wall time", targets
    )


def plot_error_vs_size(records: Sequence[dict], path: str | Path) -> Path:
    """Final validation error and training wall time against the number of training images."""
    groups = methods(records)
    several = len({a for a, _ in groups}) > 1
    fig, (ax_err, ax_time) = subplots(1, 2, figsize=(10.5, 4.0))
    for i, ((arch, arm), by_f) in enumerate(groups.items()):
        fractions = sorted(by_f)
        n = [np.mean([r["n_train"] for r in by_f[f]]) for f in fractions]
        st = style(i, arm)
        for ax, values in (
            (ax_err, [[100 * r["final_error"] for r in by_f[f]] for f in fractions]),
            (ax_time, [[r["train_s"] for r in by_f[f]] for f in fractions]),
        ):
            ax.plot(n, [np.mean(v) for v in values], marker="o", lw=1.8, label=_label(arch, arm, several), **st)
            if any(len(v) > 1 for v in values):
                ax.fill_between(
                    n, [min(v) for v in values], [max(v) for v in values], color=st["color"], alpha=0.18, lw=0
                )
    ax_err.set(title="Final validation error", ylabel="validation error (%)")
    ax_time.set(title="Training wall time", ylabel="seconds (log scale)", yscale="log")
    plain_log(ax_time.yaxis)
    for ax in (ax_err, ax_time):
        ax.set_xscale("log")
        plain_log(ax.xaxis)
        ax.set_xlabel("training images (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# the table and the report
# ---------------------------------------------------------------------------------------------
def table_csv(table: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_FIELDS)
    writer.writeheader()
    for row in table:
        writer.writerow(
            {
                k: ("" if row[k] is None else round(row[k], 4) if isinstance(row[k], float) else row[k])
                for k in TABLE_FIELDS
            }
        )
    return buf.getvalue()


def table_markdown(table: Sequence[dict]) -> str:
    head = (
        "| fraction | n train | arch | arm | seeds | final error (± sd) | best error | AUC | train time | "
        "target | reached | time to target | epochs to target | error within budget |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
        epochs = "" if r["epochs_to_target"] is None else f"{r['epochs_to_target']:g}"
        budget = fmt_pct(r["error_at_budget"]) if r["error_at_budget"] is not None else "no epoch done"
        lines.append(
            f"| {100 * r['fraction']:g}% | {r['n_train']} | {r['arch']} | {r['arm']} | {r['seeds']} | "
            f"{fmt_pct(r['final_error'])} ± {100 * r['final_error_sd']:.1f} | {fmt_pct(r['best_error'])} | "
            f"{auc} | {fmt_secs(r['train_s'])} | {fmt_pct(r['target_error'])} | {r['reached']} | "
            f"{fmt_secs(r['time_to_target_s'])} | {epochs} | {budget} in {fmt_secs(r['budget_s'])} |"
        )
    return "\n".join(lines)


def runs_markdown(records: Sequence[dict]) -> str:
    lines = [
        "| run | n train | batch | setup | mean epoch | train time | final error | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["seed"], r["fraction"], r["arch"], r["arm"])):
        epoch = float(np.mean([row["time"] for row in r["history"]]))
        lines.append(
            f"| {r['name']} | {r['n_train']} | {r['batch_size']} | {fmt_secs(r['setup_s'])} | "
            f"{fmt_secs(epoch)} | {fmt_secs(r['train_s'])} | {fmt_pct(r['final_error'])} | "
            f"{r.get('load_avg', '')} |"
        )
    return "\n".join(lines)


def notes_markdown(records: Sequence[dict], design: dict) -> str:
    """Caveats the reader needs to weigh the figures, derived from how the runs were made."""
    notes = []
    if design["image_size"] < 224:
        notes.append(
            f"Images were squashed to {design['image_size']} px for both arms, not 224 px: training from "
            f"scratch runs the whole network every step, too slow at 224 px on a CPU. ImageNet features "
            f"are learnt at 224 px, so at this size pretraining is handicapped too."
        )
    if any(r["device"] == "cpu" for r in records):
        loads = [r["load_avg"] for r in records if r.get("load_avg") is not None]
        threads = records[0].get("torch_threads")
        notes.append(
            "Timings are CPU wall clock"
            + (
                f" with {threads} torch thread{'s' if threads != 1 else ''}, 1-minute load average {min(loads):.1f} to "
                f"{max(loads):.1f} at run ends (a shared machine): treat seconds as rough and the ratios between "
                f"arms as more reliable."
                if loads
                else "."
            )
        )
    if any(r["batch_size"] < design["max_batch_size"] for r in records):
        notes.append(
            "Subsets smaller than "
            f"{design['max_batch_size'] * design['min_steps_per_epoch']} images "
            "trained with smaller batches (see the Runs table)."
        )
    return ("\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n") if notes else ""


def write_outputs(out: Path, records: Sequence[dict], summary: dict, design: dict) -> dict[str, Path]:
    """Every output file of a comparison, written atomically; returns their paths by name."""
    paths = {
        "csv": atomic_write_text(out / "time_to_target.csv", table_csv(summary["table"])),
        "error_vs_epoch": plot_error_vs_epoch(records, out / "error_vs_epoch.png"),
        "error_vs_time": plot_error_vs_time(records, out / "error_vs_time.png", summary["targets"]),
        "error_vs_size": plot_error_vs_size(records, out / "error_vs_size.png"),
    }
    atomic_write_json(out / "summary.json", {"design": design, **summary})
    d = design
    majority = summary.get("majority_error")
    baseline = f" Always answering the majority class gives {fmt_pct(majority)} error." if majority else ""
    text = f"""# Does transfer learning pay? Pretrained vs from scratch

## Answer

{summary["answer"]}

## Design

- Data: `{d["data"]}`; one patient-level validation split (seed {d["split_seed"]}): {d["n_valid"]} validation
  images ({", ".join(f"{k} {v}" for k, v in d["n_valid_per_class"].items())}), identical for every run
  (checked by a digest of the files), and {d["n_train_pool"]} training images to draw subsets from.{baseline}
- Subsets: for each seed, a fraction of each class's training patients (shuffled once per seed and class,
  so subsets are nested and stratified); the same subset for every architecture and arm.
- Arms: **pretrained** = ImageNet weights, pneumo's default path (frozen body; on a CPU the features mode:
  BatchNorm adapted once, head trained on cached features). **scratch** = `pretrained="none"`: the whole
  network trains every step (phase "scratch", full mode, augmented batches).
- Recipe: {d["epochs"]} one-cycle epochs at pneumo's defaults, {d["image_size"]} px, architectures
  {", ".join(d["archs"])}, seeds 0..{d["seeds"] - 1}, device {d["device"]}. Batch size
  min({d["max_batch_size"]}, n // {d["min_steps_per_epoch"]}) so every epoch has at least {d["min_steps_per_epoch"]}
  steps; both arms of a subset use the same batch size.
- Time: wall clock of `pneumo.train` up to the end of each epoch = setup (model, BatchNorm adaptation and
  feature extraction for the pretrained arm) + the epochs (training steps and one validation pass each). JPEG
  decoding is done once per subset before either arm is timed; the end-of-run evaluation (calibration,
  figures, export) is left out of both.
- Target error (per fraction unless given): the highest best error of any run at that fraction, rounded up
  to 0.1 point, i.e. a level every run reaches; times to it are medians over seeds. "Error within budget":
  the error each method has after the mean training time of the cheapest method at that fraction.

## Time to target error

{table_markdown(summary["table"])}

CSV: `time_to_target.csv`; every run's record: `runs/*.json` in the comparison's output folder.

## Figures

![error vs epoch](error_vs_epoch.png)

![error vs wall time](error_vs_time.png)

![error vs training-set size](error_vs_size.png)

Lines are means over seeds; bands span the minimum to the maximum over seeds.

## Runs

{runs_markdown(records)}
{notes_markdown(records, design)}"""
    paths["report"] = atomic_write_text(out / "report.md", text)
    return paths
