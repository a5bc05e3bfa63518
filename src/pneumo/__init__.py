"""pneumo: transfer learning on chest X-rays, from a folder of images to a model you can trust.

The three-line happy path::

    import pneumo
    run = pneumo.train("chest_xray/train")            # patient-level split, frozen body, one-cycle
    print(pneumo.evaluate_model(run.model_dir, "chest_xray/test"))

The layered API (as fastai's): ``check_data``, ``show_batch``, ``lr_find``, ``train``, ``evaluate_model``,
``interpret``, ``explain``, ``report``, ``load_model`` (whose ``predict`` takes a path, an array or a
PIL image), ``predict``, ``ensemble``, ``adapt``. In a notebook, figures and results display inline.
"""

from __future__ import annotations

from pneumo.errors import PneumoError
from pneumo.version import __version__

# name -> (module, attribute), imported on first use: `import pneumo` (and `pneumo --help`) stays fast.
_LAZY = {
    "check_data": ("pneumo.data.check", "check_dataset"),
    "show_batch": ("pneumo.report.notebook", "show_batch"),
    "lr_find": ("pneumo.training.lr_finder", "lr_find"),
    "train": ("pneumo.training.loop", "train"),
    "evaluate_model": ("pneumo.infer.predict", "evaluate_model_on_folder"),
    "interpret": ("pneumo.report.notebook", "interpret"),
    "explain": ("pneumo.infer.explain", "explain_image"),
    "load_model": ("pneumo.infer.model_folder", "load_model"),
    "predict": ("pneumo.infer.predict", "predict_files"),
    "ensemble": ("pneumo.infer.ensemble", "make_ensemble"),
    "adapt": ("pneumo.infer.adapt", "adapt_films"),
    "create_model": ("pneumo.nets.models", "create_model"),
}

# `report` is the subpackage pneumo.report, made callable: pneumo.report(run) writes RUN/report.html.
__all__ = ["PneumoError", "__version__", "report", *_LAZY]


def __getattr__(name: str):
    if name == "report":
        import pneumo.report

        return pneumo.report
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'pneumo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
