"""Reading a finished run: the offline HTML page and the top-losses interpretation.

``pneumo.report(run)`` writes a run's report: this package is that name (a subpackage is set as its
parent's attribute when imported, so a function of the same name could not stay there), so the
module itself is made callable, as ``pneumo.report.notebook.report``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, run: str | Path, out: str | Path | None = None) -> Any:
        from pneumo.report.notebook import report

        return report(run, out)


sys.modules[__name__].__class__ = _CallableModule
