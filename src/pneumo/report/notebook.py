"""The layered Python API's figure-making calls, shaped for a notebook (as fastai's are).

Each returns a value that displays itself inline in Jupyter (``_repr_png_`` / ``_repr_html_``) and
prints readably in a REPL; files are written only where the caller names an ``out`` (or, for the
run report, in the run folder as ``pneumo report`` writes it).
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

from pneumo.plots import Picture


def show_batch(data: str | Path, out: str | Path | None = None, **options: Any) -> Picture:
    """A grid of (augmented) training images with their labels, as ``pneumo show-batch``; written to
    ``out`` when given. ``options``: rows, cols, image_size, augment, seed."""
    from pneumo.data.show import show_batch as draw

    if out is not None:
        return Picture.from_file(draw(data, out, **options))
    with tempfile.TemporaryDirectory(prefix="pneumo-batch-") as tmp:
        return Picture(draw(data, Path(tmp) / "batch.png", **options).read_bytes())


class Interpretation(dict):
    """``interpret_run``'s result (top losses, confusion matrix) that shows both figures in a notebook."""

    def __repr__(self) -> str:
        return (
            f"Interpretation({len(self['top_losses'])} top losses, confusion matrix {self['confusion_matrix']} "
            f"(rows actual, columns predicted: {', '.join(self['classes'])}); figures {self['top_losses_png']}, "
            f"{self['confusion_matrix_png']})"
        )

    def _repr_html_(self) -> str:
        import base64

        imgs = "".join(
            f'<img style="max-width:48%" src="data:image/png;base64,'
            f'{base64.b64encode(Path(self[key]).read_bytes()).decode()}">'
            for key in ("top_losses_png", "confusion_matrix_png")
        )
        return f"<div>{imgs}</div>"


def interpret(run: str | Path, out: str | Path | None = None, k: int = 9) -> Interpretation:
    """Top losses and the confusion matrix of a run's validation set (``pneumo interpret``)."""
    from pneumo.report.interpret import interpret_run

    return Interpretation(interpret_run(run, out=out, k=k))


class Report:
    """The run report's file; a notebook shows the page itself (in a sandboxed frame)."""

    def __init__(self, path: Path):
        self.path = path

    def __repr__(self) -> str:
        return f"<Report {self.path}>"

    def __fspath__(self) -> str:
        return str(self.path)

    def _repr_html_(self) -> str:
        page = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return f'<iframe sandbox srcdoc="{page}" style="width:100%;height:640px;border:1px solid #ccc"></iframe>'


def report(run: str | Path, out: str | Path | None = None) -> Report:
    """Write the run's offline HTML report (``RUN/report.html`` unless ``out``), as ``pneumo report``."""
    from pneumo.report.html import write_report

    return Report(write_report(Path(run), None if out is None else Path(out)))
