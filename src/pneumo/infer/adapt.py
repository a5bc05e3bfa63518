"""A saved model adapted to a new site from the site's unlabelled films (``pneumo adapt``).

Two things move, and no label is read for either (a folder of class folders is only a folder):

1. **BatchNorm statistics of the body**, re-estimated on the site's films by
   ``nets.batchnorm.adapt_batchnorm``: the very pass training makes on training films (cumulative
   averages, batches of 8), so a new site's exposure, contrast, sharpness and compression are
   normalised as the training site's were. The head's BatchNorm1d layers stay as trained: they
   normalise pooled features whose mean follows the class mix, so re-estimating them would move
   decisions with the site's prevalence, and the head's linear layers were fitted to them. On the
   withheld outside test split this alone took accuracy from 0.856 to 0.893 and specificity from
   0.63 to 0.769 (0.887 with 32 films).

2. **The operating threshold**, by a rule recorded with it (``THRESHOLD_RULES``):

   - ``keep``: unchanged. pneumo's thresholds are chosen on validation for a sensitivity and a
     specificity (``youden``, ``sensitivity:0.95``); both are properties of each class's scores,
     which a change of prevalence alone does not move, so once BatchNorm has taken the site's look
     out of the scores the same threshold keeps the validation operating point's meaning.
   - ``prior``: the site's prevalence pi' is estimated by EM prior adjustment (Saerens, Latinne and
     Decaestecker 2002) on the adapted model's calibrated probabilities, and the threshold moves by
     the prior-shift formula ``odds(t') = odds(t) * pi (1 - pi') / (pi' (1 - pi))``: deciding
     ``p >= t'`` is deciding "the posterior re-weighted to the site's prevalence is >= t". pi, the
     prevalence the probabilities are calibrated to, is the mean calibrated p(positive) over the
     run's validation films (``valid_predictions.csv`` beside ``RUN/model``; EM on those films then
     returns pi exactly, so no shift means no move), else the validation label count
     (``valid_eval.json``), else what an earlier adaptation recorded.
   - ``auto`` (the default): ``prior`` for a threshold that is a cut on the posterior
     (``fixed:X``), ``keep`` for one chosen for sensitivity and specificity.

   The estimated prevalence is recorded whichever rule decides. ``bench/adapt.py`` measures both
   rules (and the number of films, below) under simulated site shifts.

The adapted model is an ordinary model folder (``model.json`` + ``model.safetensors``, or an
ensemble folder whose members are each adapted on the same films); ``model.json``'s
``adaptation`` says what was done, on how many films, with a content hash of the films (their
prepared pixels) and never a file name, path or patient ID.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumo.data.cache import decode_images
from pneumo.decision import parse_threshold_method
from pneumo.errors import PneumoError
from pneumo.infer import site_methods
from pneumo.infer.model_folder import EnsembleModel, LoadedModel, load_model, model_folder, save_model
from pneumo.infer.predict import expand_paths
from pneumo.model_meta import read_model_meta, write_model_meta
from pneumo.nets.batchnorm import BN_ADAPT_BATCH_SIZE, adapt_batchnorm, batchnorm_layers
from pneumo.run_folder import RunFolder
from pneumo.version import __version__

# The measurement on the withheld outside split: BatchNorm re-estimated on 32 of its 624
# films gave accuracy 0.887 against 0.893 with all of them (0.856 unadapted): 32 films (4 batches
# of 8) recover nearly all of the gain. bench/adapt.py measures 8 to 128 films again under
# simulated site shifts; re-check this figure with it on a real run before lowering it.
MIN_ADAPT_FILMS = 32
FEWEST_FILMS = 2  # even with allow_few: a BatchNorm statistic of one film is no statistic
THRESHOLD_RULES = ("auto", "keep", "prior")
PREVALENCE_LIMITS = (0.01, 0.99)  # an EM estimate is clipped here, so a moved threshold stays finite
METHODS = ("batchnorm", "tent", "self-training")
DEFAULT_METHOD = "batchnorm"  # measured against the others on outside-dev: bench/results/outside/*.md, README
_BN = (
    "the body's BatchNorm statistics re-estimated on the site's unlabelled films (cumulative averages, "
    f"batches of {BN_ADAPT_BATCH_SIZE})"
)
DESCRIPTIONS = {
    "batchnorm": _BN + "; the head, its BatchNorm1d included, as trained",
    "tent": _BN + "; then the body's BatchNorm scales and shifts moved to lower the entropy of the predictions "
    "on those films (TENT, statistics fixed); the head as trained",
    "self-training": _BN + "; then the head's last linear layer refitted on the films it reads with confidence "
    "(pseudo-labels), pulled towards the trained layer",
}
MEMBER_FIELDS = (  # what an ensemble member's model.json repeats of the ensemble's record
    "method",
    "description",
    "films",
    "films_skipped",
    "films_sha256",
    "labels_used",
    "date",
    "batch_size",
    "min_films",
    "few_films_allowed",
    "pneumo_version",
)
PREVALENCE_METHOD = "EM prior adjustment (Saerens et al. 2002) on the adapted model's calibrated probabilities"


@dataclass
class Adaptation:
    """An adapted model in memory (the given model is untouched) and what ``model.json`` records."""

    model: LoadedModel
    record: dict[str, Any]


@dataclass
class AdaptResult:
    """What ``adapt_films`` did: the folder written, the record, and the files it could not read."""

    out: Path
    record: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason; reported, never recorded

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "adaptation": self.record, "skipped": self.skipped}


# ---------------------------------------------------------------- the threshold, without labels


def estimate_prevalence(p_pos: np.ndarray, prior: float, iterations: int = 1000, tol: float = 1e-9) -> float:
    """The positive fraction among films whose posteriors ``p_pos`` are calibrated to ``prior``.

    EM of Saerens, Latinne and Decaestecker (2002, Neural Computation 14): re-weight every posterior
    to the current estimate, take their mean as the next estimate, until it stops moving.
    """
    p = np.clip(np.asarray(p_pos, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)
    if p.size == 0:
        raise PneumoError("no probabilities to estimate a prevalence from")
    prior = float(np.clip(prior, *PREVALENCE_LIMITS))
    pi = prior
    for _ in range(iterations):
        a, b = p * (pi / prior), (1 - p) * ((1 - pi) / (1 - prior))
        new = float(np.mean(a / (a + b)))
        done = abs(new - pi) < tol
        pi = new
        if done:
            break
    return float(np.clip(pi, *PREVALENCE_LIMITS))


def prior_shift_threshold(threshold: float, prior: float, prevalence: float) -> float:
    """The threshold on the unadjusted p that decides as ``threshold`` does on the posterior re-weighted
    from ``prior`` to ``prevalence``: ``odds(t') = odds(t) * prior (1 - prevalence) / (prevalence (1 - prior))``."""
    if not 0.0 < threshold < 1.0:
        return float(threshold)  # 0 and 1 call everything (nothing) positive at any prevalence
    odds = threshold / (1 - threshold) * (prior * (1 - prevalence)) / (prevalence * (1 - prior))
    return float(odds / (1 + odds))


def check_method(method: str) -> None:
    """Refuse an unknown adaptation method (before any film is decoded)."""
    if method not in METHODS:
        raise PneumoError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def resolve_rule(rule: str, threshold_method: str) -> str:
    """``keep`` or ``prior`` for ``rule``; ``auto``: prior for a posterior cut (fixed:X), else keep."""
    if rule not in THRESHOLD_RULES:
        raise PneumoError(f"unknown threshold rule {rule!r}: use one of {', '.join(THRESHOLD_RULES)}")
    if rule != "auto":
        return rule
    try:
        kind, _ = parse_threshold_method(threshold_method)
    except PneumoError:
        return "keep"
    return "prior" if kind == "fixed" else "keep"


def training_prevalence(model: str | Path) -> dict[str, Any] | None:
    """The positive fraction the model's probabilities are calibrated to, and where it comes from.

    An earlier adaptation's record first (an adapted folder keeps the training site's figure); then
    the run folder around ``RUN/model``: the mean calibrated p(positive) over its validation films,
    else their label count; None when neither is at hand (the ``prior`` rule then cannot run).
    """
    folder = model_folder(model)
    meta = read_model_meta(folder / "model.json")
    recorded = meta.adaptation.get("training_prevalence")
    if isinstance(recorded, dict) and _is_fraction(recorded.get("value")):
        return {"value": float(recorded["value"]), "source": str(recorded.get("source", "an earlier adaptation"))}
    pos = meta.positive_index
    if pos is None or folder.name != "model":
        return None
    run = RunFolder(folder.parent)
    if run.predictions_file.is_file():
        try:
            preds = run.read_predictions(meta.classes)
        except PneumoError:
            preds = None
        if preds is not None and len(preds.paths):
            return {
                "value": float(preds.probs[:, pos].mean()),
                "source": f"mean calibrated p({meta.classes[pos]}) over the run's {len(preds.paths)} validation "
                "films (valid_predictions.csv)",
            }
    if run.evaluation_file.is_file():
        try:
            m = run.read_evaluation().get("metrics", {})
        except PneumoError:
            m = {}
        n, n_pos = m.get("n"), m.get("n_pos")
        if isinstance(n, int) and isinstance(n_pos, int) and 0 < n_pos < n:
            return {"value": n_pos / n, "source": f"{n_pos} of the run's {n} validation films (valid_eval.json)"}
    return None


def _is_fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 < v < 1.0


def _is_fraction_or_edge(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def films_hash(pixels: np.ndarray) -> str:
    """SHA-256 over the sorted SHA-256 digests of each film's prepared pixels: the same films (in any
    order, from any path) give the same hash; no name, path or ID goes in."""
    digests = sorted(hashlib.sha256(np.ascontiguousarray(film).tobytes()).digest() for film in pixels)
    shape = "x".join(map(str, np.shape(pixels)[1:]))
    return hashlib.sha256(shape.encode() + b"".join(digests)).hexdigest()


# ---------------------------------------------------------------- adapting in memory


def check_enough(n: int, allow_few: bool, where: str = "the films given") -> None:
    """Refuse fewer than MIN_ADAPT_FILMS readable films (fewer than FEWEST_FILMS even with allow_few)."""
    need = FEWEST_FILMS if allow_few else MIN_ADAPT_FILMS
    if n < need:
        hint = "" if allow_few else " (--allow-few adapts on fewer, at least 2, with noisier statistics)"
        raise PneumoError(f"{n} readable film{'s' * (n != 1)} found in {where}; adaptation needs at least {need}{hint}")


def _adapted_single(
    model: LoadedModel, pixels: np.ndarray, progress: bool, method: str = DEFAULT_METHOD
) -> tuple[LoadedModel, int, dict[str, Any]]:
    net = copy.deepcopy(model.net)
    adapt_batchnorm(net, pixels, model.device, BN_ADAPT_BATCH_SIZE, progress=progress)
    net.eval()
    adapted = LoadedModel(net, copy.deepcopy(model.meta), model.device)
    done: dict[str, Any] = {}
    if method == "tent":
        done = site_methods.entropy_minimisation(adapted, pixels, progress)
    elif method == "self-training":
        done = site_methods.self_training(adapted, pixels, progress)
    return adapted, len(batchnorm_layers(net.body)), done


def adapt_loaded(
    model: LoadedModel,
    pixels: np.ndarray,
    threshold_rule: str = "auto",
    prevalence: dict[str, Any] | None = None,
    allow_few: bool = False,
    skipped: int = 0,
    where: str = "the films given",
    progress: bool = True,
    method: str = DEFAULT_METHOD,
) -> Adaptation:
    """``model`` adapted to the films ``pixels`` (uint8 ``(N, size, size)``, as ``decode_images`` gives).

    ``prevalence`` is ``training_prevalence(model_dir)``; without it the ``prior`` rule is refused
    (``auto`` keeps the threshold). An ensemble's members are each adapted on the same films and the
    ensemble's threshold follows the rule on its mean probabilities.
    """
    check_method(method)
    pixels = np.asarray(pixels)
    n = len(pixels)
    check_enough(n, allow_few, where)
    meta = model.meta
    members = getattr(model, "members", None)
    if members:
        triples = [_adapted_single(m, pixels, progress, method) for m in members]
        adapted: LoadedModel = EnsembleModel([m for m, _, _ in triples], copy.deepcopy(meta), model.device)
        member_layers = [k for _, k, _ in triples]
        layers = sum(member_layers)
        steps = [d for _, _, d in triples]
    else:
        adapted, layers, done = _adapted_single(model, pixels, progress, method)
        steps = [done]

    earlier = meta.adaptation.get("threshold") if isinstance(meta.adaptation.get("threshold"), dict) else {}
    before = float(earlier["before"]) if _is_fraction_or_edge(earlier.get("before")) else float(meta.threshold)
    prevalence = prevalence or None
    record: dict[str, Any] = {
        "method": method,
        "description": DESCRIPTIONS[method],
        "films": n,
        "films_skipped": int(skipped),
        "films_sha256": films_hash(pixels),
        "labels_used": False,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batchnorm_layers": layers,
        "batch_size": BN_ADAPT_BATCH_SIZE,
        "min_films": MIN_ADAPT_FILMS,
        "few_films_allowed": bool(allow_few and n < MIN_ADAPT_FILMS),
        "training_prevalence": prevalence,
        "estimated_prevalence": None,
        "prevalence_method": None,
        "threshold": None,
        "pneumo_version": __version__,
    }
    if method != "batchnorm":
        record["steps"] = steps  # per network: what the step beyond BatchNorm did
    pos = meta.positive_index
    after = before
    if pos is not None:
        rule = resolve_rule(threshold_rule, meta.threshold_method)
        if prevalence is not None:
            p_pos = adapted.probabilities(pixels)[:, pos]
            record["estimated_prevalence"] = estimate_prevalence(p_pos, prevalence["value"])
            record["prevalence_method"] = PREVALENCE_METHOD
        elif rule == "prior" and threshold_rule == "prior":
            raise PneumoError(
                "the prior threshold rule needs the prevalence the model's probabilities are calibrated to, "
                "and this model folder has no run folder around it (RUN/valid_predictions.csv) nor an earlier "
                "adaptation's record; use --threshold keep, or adapt RUN/model"
            )
        if rule == "prior" and prevalence is not None:
            pi, new = prevalence["value"], record["estimated_prevalence"]
            after = prior_shift_threshold(before, pi, new)
            how = (
                f"moved by the prior-shift formula odds(t') = odds(t) * pi (1 - pi') / (pi' (1 - pi)), "
                f"pi = {pi:.4f} (training site), pi' = {new:.4f} (estimated on these films)"
            )
        elif rule == "prior":  # auto on a posterior cut, but no prevalence to move it by
            rule, how = "keep", "kept: the prevalence the model is calibrated to is unknown (no run folder around it)"
        elif threshold_rule == "keep":
            how = f"kept as asked (chosen on validation by {meta.threshold_method})"
        else:
            how = (
                f"kept: chosen on validation by {meta.threshold_method}, an operating point of sensitivity and "
                "specificity that the site's prevalence alone does not move"
            )
        record["threshold"] = {"before": before, "after": after, "rule": rule, "requested": threshold_rule, "how": how}

    final_meta = replace(adapted.meta, threshold=after, adaptation=record)
    if members:
        shared = {k: record[k] for k in MEMBER_FIELDS}
        for m, k in zip(adapted.members, member_layers):  # each member says what was done to it
            m.meta.adaptation = {
                **shared,
                "batchnorm_layers": k,
                "threshold": None,
                "note": "member of an adapted ensemble: the ensemble's model.json holds the threshold",
            }
        adapted = EnsembleModel(adapted.members, final_meta, model.device)
    else:
        adapted = LoadedModel(adapted.net, final_meta, model.device)
    return Adaptation(adapted, record)


def evaluation_adapter(
    model: str | Path,
    threshold_rule: str = "auto",
    allow_few: bool = False,
    progress: bool = True,
    method: str = DEFAULT_METHOD,
) -> Callable[[LoadedModel, np.ndarray], tuple[LoadedModel, dict[str, Any]]]:
    """What ``evaluate_model_on_folder(adapt=...)`` calls: adapt on the evaluated films, labels unused."""
    resolve_rule(threshold_rule, "youden")  # a typo fails before any film is read
    check_method(method)
    prevalence = training_prevalence(model)

    def adapt(loaded: LoadedModel, pixels: np.ndarray) -> tuple[LoadedModel, dict[str, Any]]:
        done = adapt_loaded(
            loaded,
            pixels,
            threshold_rule=threshold_rule,
            prevalence=prevalence,
            allow_few=allow_few,
            where="the evaluated films",
            progress=progress,
            method=method,
        )
        return done.model, done.record

    return adapt


# ---------------------------------------------------------------- model folders


def write_adapted(adapted: LoadedModel, out: Path) -> Path:
    """The adapted model as a model folder; an ensemble as an ensemble folder of adapted members."""
    members = getattr(adapted, "members", None)
    if members:
        for name, member in zip(adapted.meta.members, members):
            save_model(member.net, member.meta, out / name)
        write_model_meta(out / "model.json", adapted.meta)  # last: until it exists, no model is there
        return out
    return save_model(adapted.net, adapted.meta, out)


def adapt_films(
    model: str | Path,
    films: str | Path | Sequence[str | Path],
    out: str | Path,
    threshold_rule: str = "auto",
    allow_few: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    method: str = DEFAULT_METHOD,
) -> AdaptResult:
    """Adapt the model folder ``model`` to the images under ``films`` and write it to ``out``.

    ``films``: image files and folders, searched recursively as ``pneumo predict`` does; labels are
    never read. Unreadable files are skipped and returned in ``skipped``.
    """
    out = Path(out)
    resolve_rule(threshold_rule, "youden")  # a typo fails before any film is read
    check_method(method)
    if (out / "model.json").exists():
        raise PneumoError(f"{out} holds a model already; choose another --out")
    source = model_folder(model)
    loaded = load_model(source, device)
    paths = expand_paths([films] if isinstance(films, (str, Path)) else list(films))
    decoded = decode_images(paths, loaded.meta.image_size, progress=progress, use_cache=False)
    pixels = np.asarray(decoded.pixels)[decoded.ok]
    where = str(films) if isinstance(films, (str, Path)) else f"{len(paths)} files"
    skipped = len(paths) - int(decoded.ok.sum())
    if skipped:
        where += f" ({skipped} unreadable, skipped)"
    done = adapt_loaded(
        loaded,
        pixels,
        threshold_rule=threshold_rule,
        prevalence=training_prevalence(source),
        allow_few=allow_few,
        skipped=skipped,
        where=where,
        progress=progress,
        method=method,
    )
    write_adapted(done.model, out)
    return AdaptResult(out, done.record, dict(decoded.errors))


def adapt_model(
    model_dir: str | Path, films: str | Path | Sequence[str | Path], out: str | Path, **options: Any
) -> Path:
    """``adapt_films`` for callers who want the folder: the adapted model folder ``out``."""
    return adapt_films(model_dir, films, out, **options).out


def format_adaptation(record: dict[str, Any]) -> str:
    """One paragraph for a person: films, BatchNorm, threshold and prevalence."""
    lines = [
        f"adapted on {record['films']} unlabelled films (labels unused"
        + (f"; {record['films_skipped']} unreadable skipped" if record.get("films_skipped") else "")
        + f"): BatchNorm statistics of {record['batchnorm_layers']} body layers re-estimated"
        + (", the head as trained" if record.get("method", "batchnorm") == "batchnorm" else "")
    ]
    if record.get("method", "batchnorm") != "batchnorm":
        lines.append(f"  method       {record['method']}: {record['description']}")
    t = record.get("threshold")
    if t:
        lines.append(f"  threshold    {t['before']:.4f} -> {t['after']:.4f} ({t['rule']}: {t['how']})")
    if record.get("estimated_prevalence") is not None:
        pi = record["training_prevalence"]
        lines.append(
            f"  prevalence   {record['estimated_prevalence']:.3f} estimated on these films "
            f"(training site {pi['value']:.3f})"
        )
    if record.get("few_films_allowed"):
        lines.append(f"  note: fewer films than the {record['min_films']} adaptation is measured for (--allow-few)")
    return "\n".join(lines)


__all__ = [
    "MIN_ADAPT_FILMS",
    "THRESHOLD_RULES",
    "AdaptResult",
    "Adaptation",
    "adapt_films",
    "adapt_loaded",
    "adapt_model",
    "estimate_prevalence",
    "evaluation_adapter",
    "format_adaptation",
    "prior_shift_threshold",
    "training_prevalence",
]
