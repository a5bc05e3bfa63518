"""Is a film what the model was made for? A frontal chest radiograph like its validation films.

Two checks, and a film failing either gets ``in_scope: false`` with the reason instead of a label:

1. DICOM tags (any model): Modality not a radiograph (CR/DX), BodyPartExamined not the chest,
   ViewPosition not frontal (PA/AP), or, when BodyPartExamined is absent, a study/series/protocol
   description naming another body part (the dental film says only "TEETH" there). Only names from
   pneumo's own word lists are ever echoed in a reason, never free text from the file.
2. Feature distance (models trained by a pneumo that writes ``scope.safetensors``): the body's
   average-pooled features of the validation films span a subspace (their top ``COMPONENTS``
   principal components); a film's distance from it (the norm of the residual) above the 99.5th
   percentile of validation films' distances (each measured with the subspace fitted on the other
   half, so the percentile is held-out) is out of scope. Measured on the shared films
   (README): photos and the dental and tibia films are flagged, full-resolution Kermany films are
   not; what it misses is said there too. A model validated on fewer than ``MIN_DISTANCE_FILMS``
   films is not checked by distance (its percentile is about the largest of a handful of distances,
   and films like its own fall above it): tags decide, and every verdict says why.

An ensemble combines its members' distances as the mean of each member's distance over its own
threshold, with a threshold chosen the same way on the members' held-out validation distances.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

from pneumo.data.dicom import SCOPE_TAGS, is_dicom, looks_like_dicom, read_tags
from pneumo.errors import ImageError
from pneumo.io_utils import atomic_write, atomic_write_json

if TYPE_CHECKING:  # torch is imported only where features are computed: the onnx runtime checks tags alone
    from pneumo.infer.model_folder import LoadedModel

SCOPE_FILE = "scope.safetensors"  # a trained model's subspace and threshold
ENSEMBLE_SCOPE_FILE = "scope.json"  # an ensemble's threshold over its members' distance ratios
COMPONENTS = 32
PERCENTILE = 99.5
# Fewer validation films than this and the distance check is not trusted: DICOM tags decide, as the
# threshold rules fall back below evaluation.metrics.MIN_THRESHOLD_FILMS_PER_CLASS. Measured by
# bench/scope_valid_films.py (bench/results/scope_valid_films.json; the demo model's features, 1,400
# in-distribution films, 40 draws per size): a scope fitted on N films calls this share of other
# in-distribution films out of scope (mean over draws, nominal 0.5 %): 6.4 % at 8, 1.9 % at 40 (the
# demo), 1.2 % at 60, 0.7 % at 80, 0.5 % from 120 on. 80 is the smallest N from which on the mean
# stays under 1 % and nine draws in ten under 2 %.
MIN_DISTANCE_FILMS = 80
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}
CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "TORAX", "THORAX", "CXR", "PULMO")
FRONTAL_VIEWS = {"PA", "AP", "APS", "APE"}  # plus empty: many exports leave it out
OTHER_BODY_PARTS = (
    "TEETH", "DENTAL", "TOOTH", "JAW", "MANDIBLE", "SKULL", "HEAD", "BRAIN", "NECK", "CSPINE", "SPINE", "LSPINE",
    "ABDOMEN", "PELVIS", "HIP", "KNEE", "LEG", "TIBIA", "FEMUR", "ANKLE", "FOOT", "SHOULDER", "HUMERUS", "ARM",
    "ELBOW", "WRIST", "HAND", "FINGER", "EXTREMITY", "BREAST", "MAMMO",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. DICOM tags
# ---------------------------------------------------------------------------------------------
KNOWN_VALUES = set(OTHER_BODY_PARTS) | {
    "CT", "MR", "US", "NM", "PT", "MG", "XA", "RF", "OT", "SC", "ES", "IO", "PX",
    "LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "OBL", "OBLIQUE",
}  # fmt: skip


def _word(text: str) -> str:
    """A tag value as it may appear in a reason: only a term from pneumo's own lists, never free text."""
    value = text.upper().strip()
    return value if value in KNOWN_VALUES else "another value"


def dicom_tag_reasons(tags: dict[str, str]) -> list[str]:
    """Why the tags say this is not a frontal chest radiograph (empty when they do not say so)."""
    reasons = []
    modality = tags.get("Modality", "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        reasons.append(f"DICOM Modality is {_word(modality)}, not a radiograph (CR/DX)")
    body = tags.get("BodyPartExamined", "").upper()
    if body and not any(w in body for w in CHEST_WORDS):
        reasons.append(f"DICOM BodyPartExamined is {_word(body)}, not the chest")
    if not body:
        text = " ".join(tags.get(k, "") for k in ("StudyDescription", "SeriesDescription", "ProtocolName")).upper()
        named = [w for w in OTHER_BODY_PARTS if w in text]
        if named and not any(w in text for w in CHEST_WORDS):
            reasons.append(f"DICOM study/series description names {named[0]}, not the chest")
    view = tags.get("ViewPosition", "").upper()
    if view and view not in FRONTAL_VIEWS:
        reasons.append(f"DICOM ViewPosition is {_word(view)}, not a frontal (PA/AP) film")
    return reasons


def dicom_reasons(source: Path | bytes | None) -> list[str]:
    """Tag reasons for a DICOM file or upload; nothing for other images or unreadable headers."""
    if source is None:
        return []
    if isinstance(source, bytes) and not looks_like_dicom(source[:132]):
        return []
    if isinstance(source, Path) and not is_dicom(source):
        return []
    try:
        return dicom_tag_reasons(read_tags(source, SCOPE_TAGS))
    except ImageError:
        return []


# ---------------------------------------------------------------------------------------------
# 2. Feature distance
# ---------------------------------------------------------------------------------------------
@dataclass
class FeatureScope:
    """A subspace of validation features and the distance from it that 99.5% of validation films stay under."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    threshold: float
    valid_distances: np.ndarray  # held-out, one per validation film in its order (for ensembles)

    def distances(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        return np.sqrt((residual**2).sum(axis=1))


def _subspace(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    return mean, vt[:k]


def fit_feature_scope(features: np.ndarray, seed: int = 0) -> FeatureScope:
    """Fit on validation features ``(N, D)``; the threshold is the 99.5th percentile of held-out
    distances (two halves, each measured against the subspace of the other)."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    k = max(1, min(COMPONENTS, n // 2 - 1))
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    held = np.zeros(n)
    for fit_on, measure in (halves, halves[::-1]):
        mean, comps = _subspace(features[fit_on], k)
        held[measure] = FeatureScope(mean, comps, 0.0, np.zeros(0)).distances(features[measure])
    mean, comps = _subspace(features, k)
    return FeatureScope(mean, comps, float(np.percentile(held, PERCENTILE)), held)


def scope_features(model: LoadedModel, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The body's average-pooled features ``(N, C)`` of uint8 ``(N, H, W)`` pixels (a single network),
    as ``LoadedModel.logits_and_features`` gives them beside the logits."""
    return model.logits_and_features(np.ascontiguousarray(pixels), batch_size)[1][0]


def _members(model: Any) -> list[Any]:
    """An ensemble's members, or the model itself (duck-typed: the onnx runtime's models have no members)."""
    return list(getattr(model, "members", None) or [model])


def save_feature_scope(scope: FeatureScope, folder: str | Path) -> Path:
    tensors = {
        "mean": scope.mean.astype(np.float32),
        "components": scope.components.astype(np.float32),
        "valid_distances": scope.valid_distances.astype(np.float32),
    }
    meta = {"threshold": repr(scope.threshold), "percentile": str(PERCENTILE), "features": "body average pool"}
    path = Path(folder) / SCOPE_FILE
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_feature_scope(folder: str | Path) -> FeatureScope | None:
    """The stored scope of a model folder, or None (an older folder, or a damaged file)."""
    path = Path(folder) / SCOPE_FILE
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            threshold = float((handle.metadata() or {})["threshold"])
        t = load_file(str(path))
        mean, comps = t["mean"].astype(np.float64), t["components"].astype(np.float64)
        scope = FeatureScope(mean, comps, threshold, t["valid_distances"])
    except Exception:  # noqa: BLE001 - a damaged stats file only turns the distance check off
        return None
    ok = scope.components.ndim == 2 and scope.components.shape[1] == scope.mean.shape[0] and threshold > 0
    return scope if ok else None


def write_ensemble_scope(member_folders: Sequence[Path], out_folder: Path) -> float | None:
    """An ensemble's threshold on the mean of its members' distance ratios (None: a member has no stats)."""
    scopes = [read_feature_scope(f) for f in member_folders]
    if any(s is None for s in scopes) or len({len(s.valid_distances) for s in scopes}) != 1:
        return None
    ratios = np.mean([s.valid_distances / s.threshold for s in scopes], axis=0)
    threshold = float(np.percentile(ratios, PERCENTILE))
    atomic_write_json(out_folder / ENSEMBLE_SCOPE_FILE, {"threshold": threshold, "percentile": PERCENTILE})
    return threshold


def _scope_sources(model: Any) -> tuple[list[Path | None], Path | None | bool] | None:
    """Each network's folder (where its statistics lie) and the ensemble's folder (``False`` for a
    single model, None for an ensemble loaded from nowhere); None when the model gives no features
    (an ONNX graph exported before it did). Torch models carry their folders, ONNX ones the sidecar's."""
    if hasattr(model, "net"):
        members = _members(model)
        return [getattr(m, "folder", None) for m in members], (model.folder if hasattr(model, "members") else False)
    sources = getattr(model, "scope_sources", None)
    if sources is None:
        return None
    folders, ensemble = sources
    return list(folders), ensemble if ensemble is not None else False


# ---------------------------------------------------------------------------------------------
# Both, for a loaded model
# ---------------------------------------------------------------------------------------------
class ScopeCheck:
    """The scope checks a loaded model supports; ``check`` gives one verdict per film."""

    def __init__(self, model: Any):
        self.model = model
        sources = _scope_sources(model)
        folders, ensemble = sources if sources is not None else ([None], None)
        self.scopes = [read_feature_scope(f) if f else None for f in folders]
        self.threshold = 1.0
        self.gives_features = sources is not None  # an ONNX graph exported before it gave them does not
        if sources is not None and ensemble is not False:
            path = ensemble / ENSEMBLE_SCOPE_FILE if ensemble else None
            try:
                self.threshold = float(json.loads(path.read_text())["threshold"]) if path else float("nan")
            except (OSError, ValueError, KeyError, TypeError):
                self.threshold = float("nan")
        measured = all(s is not None for s in self.scopes) and bool(np.isfinite(self.threshold))
        self.valid_films = min(len(s.valid_distances) for s in self.scopes) if measured else 0
        self.not_trusted = (
            f"distance check not trusted: the model was validated on {self.valid_films} films, "
            f"fewer than {MIN_DISTANCE_FILMS}"
            if measured and self.valid_films < MIN_DISTANCE_FILMS
            else ""
        )
        self.by_features = measured and not self.not_trusted

    @property
    def method(self) -> str:
        if self.by_features:
            return "DICOM tags and distance from the validation films' features"
        if self.not_trusted:
            return f"DICOM tags only ({self.not_trusted})"
        if not self.gives_features:
            return "DICOM tags only (this ONNX export gives no body features to measure a distance with: re-export it)"
        return "DICOM tags only (this model folder has no scope statistics: trained before pneumo wrote them)"

    def ratios(self, pixels: np.ndarray, features: Sequence[np.ndarray] | None = None) -> np.ndarray | None:
        """Distance over threshold per film (> 1: out of scope), or None without stats. ``features``:
        each member's, when the prediction already computed them (else a pass of their own)."""
        if not self.by_features or len(pixels) == 0:
            return None
        if features is None and hasattr(self.model, "net"):
            features = [scope_features(m, pixels) for m in _members(self.model)]
        elif features is None:  # the onnx runtime: its graph gives the features beside the probabilities
            features = self.model.probabilities_and_features(pixels)[1]
        per_member = [s.distances(f) / s.threshold for f, s in zip(features, self.scopes)]
        return np.mean(per_member, axis=0) / self.threshold

    def read(
        self, pixels: np.ndarray, sources: Sequence[Path | bytes | None], tta: bool = False
    ) -> tuple[np.ndarray, list[dict]]:
        """The model's probabilities and a verdict per film (``check``), from one pass through each
        network where scope is measured on features."""
        if not self.by_features:
            return self.model.probabilities(pixels, tta=tta), self.check(pixels, sources)
        probs, features = self.model.probabilities_and_features(pixels, tta=tta)
        return probs, self.check(pixels, sources, features)

    def check(
        self,
        pixels: np.ndarray,
        sources: Sequence[Path | bytes | None],
        features: Sequence[np.ndarray] | None = None,
    ) -> list[dict]:
        """``{"in_scope", "scope_reason", "scope_distance"}`` per film (pixels prepared at the model's size).
        ``scope_reason``: why a film is out of scope, and whatever the check could not use (an
        untrusted distance check says so on every film)."""
        ratios = self.ratios(pixels, features)
        out = []
        for i, source in enumerate(sources):
            reasons = dicom_reasons(source)
            ratio = None if ratios is None else float(ratios[i])
            if ratio is not None and ratio > 1.0:
                reasons.append(
                    f"far from the training films (feature distance {ratio:.2f}x the 99.5th percentile "
                    f"of validation films)"
                )
            notes = [self.not_trusted] if self.not_trusted else []
            out.append({"in_scope": not reasons, "scope_reason": "; ".join(reasons + notes), "scope_distance": ratio})
        return out
