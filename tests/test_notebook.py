"""examples/quickstart.ipynb runs top to bottom in a fresh kernel, and its results display inline."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def outputs_of(cell) -> dict[str, str]:
    """mime type -> content of a cell's displayed result(s)."""
    found: dict[str, str] = {}
    for out in cell.get("outputs", []):
        if out.get("output_type") in ("execute_result", "display_data"):
            found.update(out["data"])
    return found


@pytest.mark.timeout(240)
def test_quickstart_notebook_runs_and_shows_its_results_inline(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[-1]: outputs_of(c) for c in code}
    assert "'train'" in by_source['[name for name in dir(pneumo) if not name.startswith("_")]']["text/plain"]
    assert "image/png" in by_source["pneumo.show_batch(SAMPLE, rows=2, image_size=64)"]
    assert "image/png" in by_source["lr"] and "suggestion" in by_source["lr"]["text/plain"]
    assert "<table>" in by_source["run"]["text/html"] and "RunResult(" in by_source["run"]["text/plain"]
    assert "Evaluation(test" in by_source["evaluation"]["text/plain"]
    assert "p(PNEUMONIA)" in by_source["model.predict(film)"]["text/plain"]
    assert "image/png" in by_source["pneumo.explain(model, film)"]
    assert "<img" in by_source["pneumo.interpret(run.run_dir)"]["text/html"]
    assert "<iframe" in by_source["pneumo.report(run.run_dir)"]["text/html"]
    assert (tmp_path / "runs" / "quickstart" / "run" / "report.html").is_file()
