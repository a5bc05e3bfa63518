"""pneumo: transfer learning on chest X-rays, from a folder of images to a model you can trust.

The three-line happy path::

    import pneumo
    run = pneumo.train("chest_xray/train")            # patient-level split, frozen body, one-cycle
    print(pneumo.evaluate_model(run.model_dir, "chest_xray/test"))
"""

from __future__ import annotations

from pneumo.errors import PneumoError
from pneumo.version import __version__

__all__ = ["PneumoError", "__version__", "train", "evaluate_model", "lr_find", "load_model", "create_model"]


def __getattr__(name: str):
    # Lazy imports keep `import pneumo` (and `pneumo --help`) fast: torch loads only when needed.
    if name == "train":
        from pneumo.training.loop import train

        return train
    if name == "evaluate_model":
        from pneumo.infer.predict import evaluate_model_on_folder

        return evaluate_model_on_folder
    if name == "lr_find":
        from pneumo.training.lr_finder import lr_find

        return lr_find
    if name == "create_model":
        from pneumo.nets.models import create_model

        return create_model
    if name == "load_model":
        from pneumo.infer.model_folder import load_model

        return load_model
    raise AttributeError(name)
