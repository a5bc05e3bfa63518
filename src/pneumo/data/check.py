"""``pneumo data check``: what is on disk, and what in it would quietly spoil training or evaluation.

Every file is read once: its bytes are hashed (exact duplicates), its header gives size and mode,
and it is decoded in full, since a truncated JPEG opens fine and only fails when its pixels are read.
Problems that would corrupt training (a class missing from a split, an empty class folder, no images)
are ``errors``; things a user should know before trusting a number are ``warnings``. The errors that
need no decoding (``structure_errors``) are also what ``pneumo train`` refuses before any work
(``require_trainable``): the rule has one owner. File names are reported as ``folders.printable``
spells them, so a name that is not valid UTF-8 prints on any terminal and stays valid JSON.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pneumo.data.cache import content_digest, over_files
from pneumo.data.folders import MIN_USABLE_VALID, SPLIT_ALIASES, ChestXrayFolder, discover, printable, subtype_of
from pneumo.data.folders import patient_rule as resolve_patient_rule
from pneumo.data.imaging import open_image
from pneumo.errors import DataError, ImageError

IMBALANCE_RATIO = 1.5  # largest / smallest class above this earns a warning
MODE_BITS = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I;16N": 16,
    "I": 32,
    "F": 32,
}
LISTED = 10  # items a warning names before it says "and N more"
SPLIT_ORDER = ["train", "valid", "test"]


@dataclass
class FileFacts:
    """What one read of a file tells: header facts, a content hash, and whether it decodes."""

    width: int | None = None
    height: int | None = None
    mode: str | None = None
    n_bytes: int = 0
    digest: str | None = None
    problem: str | None = None


def inspect_file(path: Path) -> FileFacts:
    """Read ``path`` once; hash it, read its header, decode it fully. Never raises."""
    facts = FileFacts()
    try:
        data = path.read_bytes()
    except OSError as exc:
        facts.problem = f"cannot read the file ({exc.strerror or exc})"
        return facts
    facts.n_bytes = len(data)
    facts.digest = content_digest(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            facts.width, facts.height, facts.mode = img.width, img.height, img.mode
    except Exception:  # noqa: BLE001 - the full decode below names the problem
        pass
    try:
        open_image(data)
    except ImageError as exc:
        facts.problem = exc.reason
    return facts


def _relative(data: ChestXrayFolder, path: Path) -> str:
    try:
        return path.relative_to(data.root).as_posix()
    except ValueError:
        return str(path)


def _split_folder(data: ChestXrayFolder, split: str) -> Path:
    """The folder on disk behind a split name (``valid`` may be ``val/``)."""
    if data.layout != "kaggle":
        return data.root
    for d in sorted(data.root.iterdir()):
        if d.is_dir() and SPLIT_ALIASES.get(d.name.lower()) == split:
            return d
    return data.root / split


def structure_errors(data: ChestXrayFolder) -> list[str]:
    """What makes a data set unusable for training, seen without reading a pixel: one class, an empty
    class folder, a class missing from a split."""
    counts = data.counts()
    errors = []
    empty = set(data.empty_classes)
    for split, folder in ((s, _split_folder(data, s)) for s in data.splits):
        for name, n in counts[split].items():
            if (split, name) in empty:
                errors.append(
                    f"{folder / name}: empty class folder (no JPEG or PNG images); add images or remove the folder"
                )
            elif n == 0:
                errors.append(
                    f"{folder}: no '{name}' folder, though other splits have that class; every split needs every class"
                )
    for split, name in sorted(empty - {(s, c) for s in data.splits for c in data.classes}):
        errors.append(f"{_split_folder(data, split) / name}: empty class folder (no JPEG or PNG images)")
    if len(data.classes) < 2:
        errors.append(
            f"{data.root}: only one class ({', '.join(data.classes)}); a classifier needs at least two "
            f"class folders (e.g. NORMAL/ and PNEUMONIA/)"
        )
    return errors


def _unreadable_class_errors(data: ChestXrayFolder, unreadable: list[dict[str, Any]]) -> list[str]:
    """A class whose every image in a split is unreadable is as missing as an empty folder."""
    bad = Counter((u["split"], u["class"]) for u in unreadable)
    counts = data.counts()
    return [
        f"{_split_folder(data, split) / name}: none of its {n} images can be read; training would see no {name}"
        for (split, name), n in sorted(bad.items())
        if n == counts[split][name]
    ]


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def _size_summary(facts: list[FileFacts]) -> dict[str, Any]:
    known = [f for f in facts if f.width is not None]
    if not known:
        return {"width": None, "height": None, "modes": {}, "bit_depths": {}}
    modes = Counter(f.mode for f in known)
    bits = Counter(str(MODE_BITS.get(f.mode or "", "?")) for f in known)
    return {
        "width": {"min": min(f.width for f in known), "max": max(f.width for f in known)},
        "height": {"min": min(f.height for f in known), "max": max(f.height for f in known)},
        "modes": dict(modes.most_common()),
        "bit_depths": dict(sorted(bits.items())),
    }


def _duplicate_groups(data: ChestXrayFolder, facts: list[FileFacts]) -> list[dict[str, Any]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        if f.digest is not None and f.n_bytes > 0:  # empty files are reported as unreadable
            by_hash[f.digest].append(i)
    groups = []
    for digest, members in by_hash.items():
        if len(members) < 2:
            continue
        samples = sorted((data.samples[i] for i in members), key=lambda s: (SPLIT_ORDER.index(s.split), s.path))
        labels = sorted({data.classes[s.label] for s in samples})
        splits = list(dict.fromkeys(s.split for s in samples))
        groups.append(
            {
                "hash": digest,
                "files": [_relative(data, s.path) for s in samples],
                "classes": labels,
                "splits": splits,
                "patients": sorted({s.patient for s in samples}),
                "conflicting_labels": len(labels) > 1,
                "across_splits": len(splits) > 1,
                "across_patients": len({s.patient for s in samples}) > 1,
            }
        )
    return sorted(groups, key=lambda g: g["files"][0])


def _patients_across_splits(data: ChestXrayFolder) -> list[dict[str, Any]]:
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for s in data.samples:
        per_patient[s.patient][s.split] += 1
    return [
        {"patient": pid, "counts": {k: c[k] for k in SPLIT_ORDER if k in c}}
        for pid, c in sorted(per_patient.items())
        if len(c) > 1
    ]


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def _warnings(data: ChestXrayFolder, report: dict[str, Any]) -> list[str]:
    warnings = []
    for item in report["unreadable"][:LISTED]:
        warnings.append(
            f"unreadable file, skipped by training (replace or remove it): {item['path']}: {item['reason']}"
        )
    if len(report["unreadable"]) > LISTED:
        warnings.append(f"... and {len(report['unreadable']) - LISTED} more unreadable files (see --json)")
    for item in report["skipped"][:LISTED]:
        warnings.append(f"not used: {item['path']}: {item['reason']}")
    if len(report["skipped"]) > LISTED:
        warnings.append(f"... and {len(report['skipped']) - LISTED} more files not used (see --json)")
    groups = report["duplicates"]
    if groups:
        extra = sum(len(g["files"]) - 1 for g in groups)
        mixed = sum(g["across_patients"] for g in groups)
        why = (
            f"{mixed} of them join different patients, so a patient split may put copies on both sides"
            if mixed
            else "each within one patient, so a patient-level split keeps the copies together"
        )
        warnings.append(
            f"{_plural(len(groups), 'group')} of byte-identical files "
            f"({_plural(extra, 'extra copy', 'extra copies')}); {why}"
        )
    conflicting = [" = ".join(g["files"]) for g in groups if g["conflicting_labels"]]
    if conflicting:
        warnings.append(f"identical images with different labels ({len(conflicting)}): {_listing(conflicting)}")
    spanning = [" = ".join(g["files"]) for g in groups if g["across_splits"]]
    if spanning:
        warnings.append(f"identical images in more than one split ({len(spanning)}): {_listing(spanning)}")
    crossing = report["patients_across_splits"]
    if crossing:
        names = [f"{p['patient']} ({', '.join(f'{k} {v}' for k, v in p['counts'].items())})" for p in crossing]
        warnings.append(
            f"{_plural(len(crossing), 'patient')} in more than one split folder, so those splits are not "
            f"independent: {_listing(names)}"
        )
    n_valid = report["totals"]["per_split"].get("valid", 0)
    if 0 < n_valid < MIN_USABLE_VALID:
        warnings.append(
            f"{_split_folder(data, 'valid')}: only {_plural(n_valid, 'image')}, too small to judge by; "
            f"pneumo folds it into train and splits by patient; --keep-val keeps it"
        )
    if "train" not in report["counts"]:
        warnings.append(f"{data.root}: no train folder; `pneumo train` cannot use it (evaluation can)")
    for split, counts in report["counts"].items():
        present = {k: v for k, v in counts.items() if v > 0}
        if len(present) < 2:
            continue
        big, small = max(present, key=present.get), min(present, key=present.get)
        ratio = present[big] / present[small]
        if ratio > IMBALANCE_RATIO:
            warnings.append(
                f"{split} is imbalanced: {big} {present[big]:,} vs {small} {present[small]:,} "
                f"({ratio:.1f}:1); accuracy alone misleads, judge by sensitivity, specificity "
                f"and AUC (--class-balance weights reweights the loss)"
            )
    return warnings


def check_dataset(path: str | Path, patient_rule: str = "kermany", progress: bool = True) -> dict[str, Any]:
    """A JSON-ready report on the data set at ``path``: counts, sizes, unreadable files, duplicates, leaks.

    Never raises for bad data: a missing or empty root is an entry in ``errors``. An unknown
    ``patient_rule`` is a usage mistake and raises DataError.
    """
    rule = resolve_patient_rule(patient_rule)
    report: dict[str, Any] = {
        "root": str(path),
        "layout": None,
        "classes": [],
        "counts": {},
        "totals": {"images": 0, "per_split": {}, "per_class": {}},
        "subtypes": {},
        "sizes": _size_summary([]),
        "unreadable": [],
        "skipped": [],
        "duplicates": [],
        "patients_across_splits": [],
        "patient_rule": patient_rule,
        "errors": [],
        "warnings": [],
    }
    try:
        data = discover(path, rule)
    except DataError as exc:
        report["errors"].append(str(exc))
        return _printable(report)
    except OSError as exc:  # a folder we may not list: say which, never a traceback
        report["errors"].append(f"{exc.filename or path}: cannot read the folder ({exc.strerror or exc})")
        return _printable(report)
    _fill_report(report, data, progress)
    return _printable(report)


def require_trainable(data: ChestXrayFolder) -> None:
    """Raise DataError, before any work, for a data set ``pneumo data check`` fails on its structure."""
    errors = structure_errors(data)
    if errors:
        raise DataError(printable(f"cannot train on {data.root} (`pneumo data check` fails it): " + "; ".join(errors)))


def _printable(obj: Any) -> Any:
    """Every string of the report as ``folders.printable`` spells it (keys too)."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {_printable(k): _printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_printable(v) for v in obj]
    return obj


def _fill_report(report: dict[str, Any], data: ChestXrayFolder, progress: bool) -> None:
    """Everything the report says about a data set that was found: counts, then what reading each file told."""
    counts = data.counts()
    report.update(root=str(data.root), layout=data.layout, classes=list(data.classes), counts=counts)
    report["totals"] = {
        "images": len(data.samples),
        "per_split": {split: sum(c.values()) for split, c in counts.items()},
        "per_class": {name: sum(c[name] for c in counts.values()) for name in data.classes},
    }
    subtypes: dict[str, Counter] = defaultdict(Counter)
    for s in data.samples:
        if (kind := subtype_of(s.path.name)) is not None:
            subtypes[s.split][f"{data.classes[s.label]}/{kind}"] += 1
    report["subtypes"] = {split: dict(sorted(subtypes[split].items())) for split in SPLIT_ORDER if split in subtypes}

    paths = [s.path for s in data.samples]
    facts = list(over_files(inspect_file, paths, "checking images", "img", progress, chunksize=8))
    report["sizes"] = _size_summary(facts)
    report["unreadable"] = [
        {"path": _relative(data, s.path), "split": s.split, "class": data.classes[s.label], "reason": f.problem}
        for s, f in zip(data.samples, facts)
        if f.problem
    ]
    report["duplicates"] = _duplicate_groups(data, facts)
    report["patients_across_splits"] = _patients_across_splits(data)
    report["skipped"] = [{"path": _relative(data, p), "reason": why} for p, why in data.skipped]
    report["errors"] = structure_errors(data) + _unreadable_class_errors(data, report["unreadable"])
    report["warnings"] = _warnings(data, report)


def format_check(report: dict[str, Any]) -> str:
    """The report as a few readable lines: a count table, then errors and warnings, then a verdict."""
    lines = [f"data check: {report['root']}"]
    if report["layout"] is not None:
        classes = report["classes"]
        lines.append(
            f"layout: {report['layout']}; {len(classes)} classes: {', '.join(classes)}; "
            f"patient rule: {report['patient_rule']}"
        )
        width = max(9, *(len(c) + 2 for c in classes))
        lines += ["", f"{'split':<8}" + "".join(f"{c:>{width}}" for c in classes) + f"{'total':>{width}}"]
        for split, counts in report["counts"].items():
            lines.append(
                f"{split:<8}"
                + "".join(f"{counts[c]:>{width},}" for c in classes)
                + f"{report['totals']['per_split'][split]:>{width},}"
            )
        if len(report["counts"]) > 1:
            lines.append(
                f"{'all':<8}"
                + "".join(f"{report['totals']['per_class'][c]:>{width},}" for c in classes)
                + f"{report['totals']['images']:>{width},}"
            )
        for split, kinds in report["subtypes"].items():
            lines.append(f"  {split} subtypes: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()))
        sizes = report["sizes"]
        if sizes["width"]:
            w, h = sizes["width"], sizes["height"]
            modes = ", ".join(f"{m} {n:,}" for m, n in sizes["modes"].items())
            bits = ", ".join(f"{b}-bit {n:,}" for b, n in sizes["bit_depths"].items())
            lines += [
                "",
                f"image sizes: width {w['min']}-{w['max']} px, height {h['min']}-{h['max']} px",
                f"modes: {modes}; depth: {bits}",
            ]
        lines.append(f"unreadable files: {len(report['unreadable'])}")
        for item in report["unreadable"][: 3 * LISTED]:
            lines.append(f"  {item['path']}: {item['reason']}")
        lines.append(f"not used (symlink problems, formats pneumo does not read): {len(report['skipped'])}")
        for item in report["skipped"][: 3 * LISTED]:
            lines.append(f"  {item['path']}: {item['reason']}")
        lines.append(f"duplicate groups (byte-identical): {len(report['duplicates'])}")
        for g in report["duplicates"][:LISTED]:
            flags = [
                f
                for f, on in (("DIFFERENT LABELS", g["conflicting_labels"]), ("ACROSS SPLITS", g["across_splits"]))
                if on
            ]
            lines.append("  " + " = ".join(g["files"]) + (f"  [{', '.join(flags)}]" if flags else ""))
        if len(report["duplicates"]) > LISTED:
            lines.append(f"  ... and {len(report['duplicates']) - LISTED} more (see --json)")
        lines.append(f"patients in more than one split: {len(report['patients_across_splits'])}")
    for title, items in (("errors", report["errors"]), ("warnings", report["warnings"])):
        if items:
            lines += ["", f"{title} ({len(items)}):"] + [f"  - {item}" for item in items]
    n = len(report["errors"])
    lines += [
        "",
        f"FAILED: {n} error{'s' if n != 1 else ''} would corrupt training"
        if n
        else "OK: no errors" + (f" ({len(report['warnings'])} warnings)" if report["warnings"] else ""),
    ]
    return "\n".join(lines)
