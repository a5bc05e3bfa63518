"""Optional extras: import what one needs, or say which ``pip install 'pneumo[...]'`` brings it.

DICOM, ONNX, Ray, PostgreSQL, TensorBoard and MLflow are extras (``make install`` installs them all);
a command that needs a missing one fails with a ``PneumoError`` naming the extra, never an ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pneumo.errors import PneumoError


def require(extra: str, *modules: str, what: str | None = None) -> ModuleType:
    """Import ``modules`` (the last is returned) or raise naming the extra that installs them.

    ``what`` says what needed it ("--track mlflow", "reading DICOM"); the extra's name by default.
    """
    try:
        return [importlib.import_module(m) for m in modules][-1]
    except ImportError as e:
        raise PneumoError(
            f"{what or extra} needs the optional extra '{extra}': pip install 'pneumo[{extra}]' "
            f"(missing: {e.name or e})"
        ) from None


def available(*modules: str) -> bool:
    """True when every module imports (for tests and optional paths that fall back quietly)."""
    try:
        for m in modules:
            importlib.import_module(m)
    except ImportError:
        return False
    return True
