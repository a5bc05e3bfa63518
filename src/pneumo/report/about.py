"""What a model was trained on, in one sentence, for the page, the demo and the report.

A model's answers only make sense next to its training data: a demo model trained on 160 small
sample images will misread many full-resolution films, and the user should be told so where the
answer is shown. Read from ``model.json`` (its training configuration) and, when the model folder
sits in its run folder, ``valid_eval.json`` (the image counts). Only the data folder's name is
given, never its full path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumo.errors import PneumoError
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta
from pneumo.run_folder import RunFolder

SMALL_TRAINING_SET = 1000  # below this many training images, the page says the model is a demonstration


def training_summary(model_dir: str | Path, meta: ModelMeta | None = None) -> dict[str, Any]:
    """Data folder name, image counts, split, epochs, backbone and a sentence saying them."""
    folder = model_folder(model_dir)
    meta = meta or read_model_meta(folder / "model.json")
    cfg = meta.trained_with or {}
    summary: dict[str, Any] = {
        "data": Path(str(cfg.get("data", ""))).name or None,
        "split": cfg.get("split"),
        "epochs": cfg.get("epochs"),
        "unfreeze_epochs": cfg.get("unfreeze_epochs"),
        "arch": meta.arch,
        "image_size": meta.image_size,
        "n_train": None,
        "n_valid": None,
        "members": len(meta.members) or None,
    }
    run = RunFolder(folder.parent)
    if run.evaluation_file.is_file():
        try:
            ev = run.read_evaluation()
            summary["n_train"], summary["n_valid"] = ev.get("n_train"), ev.get("n_valid")
        except PneumoError:
            pass  # the sentence says less; the model still serves
    summary["sentence"] = _sentence(summary)
    return summary


def _sentence(s: dict[str, Any]) -> str:
    if s["members"]:
        return f"An ensemble of {s['members']} {s['arch']} models at {s['image_size']} px."
    if not s["data"]:
        return f"A {s['arch']} model at {s['image_size']} px; its training data are not recorded."
    counts = f"{s['n_train']} training images" if s["n_train"] else "the images"
    text = f"Trained on {counts} of {s['data']}"
    if s["n_valid"]:
        how = "other patients" if s["split"] == "patient" else "a random image split"
        text += f"; threshold and metrics from {s['n_valid']} validation images ({how})"
    epochs = (
        f"{s['epochs']} epoch"
        + ("" if s["epochs"] == 1 else "s")
        + (f" + {s['unfreeze_epochs']} fine-tuning" if s["unfreeze_epochs"] else "")
    )
    text += f"; {s['arch']} at {s['image_size']} px, {epochs}."
    if s["n_train"] and s["n_train"] < SMALL_TRAINING_SET:
        text += (
            f" Fewer than {SMALL_TRAINING_SET} training images: a demonstration model that will misread"
            " many films, especially from other sources."
        )
    return text
