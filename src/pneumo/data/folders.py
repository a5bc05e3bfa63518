"""Chest X-ray folders as the domain sees them: splits, classes, patients.

A root is either the Kaggle layout (``{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``, possibly nested
once more as ``chest_xray/chest_xray``) or a plain folder of class folders. Patient identity comes
from the file name through a pluggable rule, because several images of one patient must never sit
on both sides of a train/validation split.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pneumo.data.dicom import is_dicom, read_tags
from pneumo.errors import DataError, ImageError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "valid",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
    "testing": "test",
}
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "DICOMDIR"}
# image formats pneumo does not read: skipped by every folder walk (train, evaluate, predict) and named by
# `data check`; open_image refuses them too, as serve does, so no command reads them where another would not
UNREAD_FORMATS = {".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".webp": "WebP"}
MIN_USABLE_VALID = 100  # fewer validation images than this cannot rank models (Kaggle's val has 16)
KERMANY_CLASSES = ["NORMAL", "PNEUMONIA"]
KERMANY_TEST_PREVALENCE = 390 / 624  # the official test split: 390 pneumonia, 234 normal films (train: 0.74)

PatientRule = Callable[[str], str]


def printable(name: str | os.PathLike[str]) -> str:
    """A file name as text any terminal, JSON reader or CSV reader accepts.

    A name that is not valid UTF-8 reaches Python with its stray bytes as lone surrogates, which a
    strict UTF-8 stream refuses; here they are spelled ``\\xe9``, so the name stays recognisable.
    """
    text = os.fspath(name)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file system produced: keep it visible too
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def kermany_patient_id(filename: str) -> str:
    """Patient id in the Kermany/Kaggle names: ``person12_...``, ``IM-0115-...``, ``NORMAL2-IM-0123-...``.

    A name matching no pattern is its own patient, which is the safe default for unknown data.
    """
    name = Path(filename).name
    for pattern in (r"^(person\d+)_", r"^(NORMAL2-IM-\d+)-", r"^(IM-\d+)-"):
        match = re.match(pattern, name, flags=re.IGNORECASE)
        if match:
            return match.group(1)
    return Path(name).stem


def filename_patient_id(filename: str) -> str:
    """Each image its own patient: the rule for data sets whose names carry no patient."""
    return Path(filename).stem


PATIENT_RULES: dict[str, PatientRule] = {"kermany": kermany_patient_id, "filename": filename_patient_id}


def patient_rule(spec: str) -> PatientRule:
    """A named rule (``kermany``, ``filename``) or ``regex:PATTERN`` whose first group is the patient."""
    if spec in PATIENT_RULES:
        return PATIENT_RULES[spec]
    if spec.startswith("regex:"):
        compiled = re.compile(spec[len("regex:") :])

        def by_regex(filename: str) -> str:
            match = compiled.search(Path(filename).name)
            return match.group(1) if match and match.groups() else Path(filename).stem

        return by_regex
    raise DataError(f"unknown patient rule {spec!r}: use one of {sorted(PATIENT_RULES)} or 'regex:PATTERN'")


def reference_prevalence(classes: Sequence[str]) -> float | None:
    """The positive fraction of the population a model of these classes is judged on, when known.

    For the Kermany/Kaggle classes it is the official test split's 0.625, not train's 0.74: validation
    metrics are also reported re-weighted to it. The one owner of that figure; None for other data.
    """
    return KERMANY_TEST_PREVALENCE if list(classes) == KERMANY_CLASSES else None


def subtype_of(filename: str) -> str | None:
    """Pneumonia subtype from a Kermany file name (``bacteria`` or ``virus``), else None."""
    name = Path(filename).name.lower()
    for subtype in ("bacteria", "virus"):
        if f"_{subtype}" in name:
            return subtype
    return None


@dataclass(frozen=True)
class Sample:
    """One image: where it lies, its class index, the split folder it came from and its patient."""

    path: Path
    label: int
    split: str
    patient: str


@dataclass
class ChestXrayFolder:
    """Every image under a root, with class names taken from the folder names."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str  # "kaggle" (split folders) or "classes" (class folders only)
    empty_classes: list[tuple[str, str]] = field(default_factory=list)  # (split, class) with no image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why) inside class folders, not used

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.samples}, key=["train", "valid", "test"].index)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, every class listed even when empty."""
        out: dict[str, dict[str, int]] = {}
        for split in self.splits:
            c = Counter(self.classes[s.label] for s in self.split(split))
            out[split] = {name: c.get(name, 0) for name in self.classes}
        return out

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{split}: " + " ".join(f"{k}={v}" for k, v in c.items()) for split, c in self.counts().items()
        )
        return f"ChestXrayFolder({str(self.root)!r}, {len(self.samples)} images; {parts})"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_NAMES
    )


def is_image_file(path: Path) -> bool:
    return (
        (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path))
        and not path.name.startswith(".")
        and path.is_file()
        and not any(part in IGNORED_NAMES for part in path.parts)
    )


def skip_reason(path: Path) -> str | None:
    """Why an entry in a class folder that is not an image pneumo reads deserves a mention, else None.

    Folder walks do not follow symlinked folders (``Path.rglob``), so a loop cannot hang them.
    """
    if path.is_symlink():
        try:
            path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symlink loop; skipped"
            return "broken symlink (its target is missing); skipped"
        if path.is_dir():
            return "symlinked folder, not followed; its images are not used"
    kind = UNREAD_FORMATS.get(path.suffix.lower())
    if kind and path.is_file():
        return f"{kind} file; pneumo reads JPEG and PNG only, so it is skipped (convert it to PNG)"
    return None


def _images_under(folder: Path, skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The images under ``folder``; entries worth a mention that are not used go to ``skipped``."""
    images = []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") or part in IGNORED_NAMES for part in p.relative_to(folder).parts):
            continue
        if is_image_file(p):
            images.append(p)
        elif skipped is not None and (why := skip_reason(p)) is not None:
            skipped.append((p, why))
    return images


def _find_layout_root(root: Path) -> tuple[Path, str]:
    """Descend through wrapper folders (``chest_xray/chest_xray``) to the folder holding splits or classes."""
    current = root
    for _ in range(4):
        subdirs = _visible_dirs(current)
        if any(d.name.lower() in SPLIT_ALIASES for d in subdirs):
            return current, "kaggle"
        loose_images = [p for p in current.iterdir() if is_image_file(p)]
        if len(subdirs) == 1 and not loose_images and not _holds_images(subdirs[0]):
            current = subdirs[0]  # a wrapper, not the one class folder of a one-class data set
            continue
        return current, "classes"
    return current, "classes"


def _holds_images(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.iterdir())


def discover(root: str | Path, patient: PatientRule | str = "kermany") -> ChestXrayFolder:
    """Index a data set on disk. Raises DataError when the root holds no images at all."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise DataError(
            f"{root}: {what}; point pneumo at a folder of class folders or at the Kaggle 'chest_xray' folder"
        )
    rule = patient_rule(patient) if isinstance(patient, str) else patient
    try:
        return _discover(root, rule)
    except OSError as exc:
        raise DataError(f"{exc.filename or root}: cannot read the folder ({exc.strerror})") from None


def _discover(root: Path, rule: PatientRule) -> ChestXrayFolder:
    base, layout = _find_layout_root(root)
    if layout == "kaggle":
        split_dirs = [
            (SPLIT_ALIASES[d.name.lower()], d) for d in _visible_dirs(base) if d.name.lower() in SPLIT_ALIASES
        ]
    else:
        split_dirs = [("train", base)]
    classes = sorted({c.name for _, d in split_dirs for c in _visible_dirs(d)})
    if not classes:
        expected = ", ".join(str(base / name) for name in KERMANY_CLASSES)
        if any(_holds_images(d) for _, d in split_dirs):
            raise DataError(f"found images directly in {base} but no class folders; expected {expected}")
        raise DataError(f"{base}: found no class folders; expected {expected}")
    samples: list[Sample] = []
    empty: list[tuple[str, str]] = []
    skipped: list[tuple[Path, str]] = []
    for split, split_dir in split_dirs:
        for class_dir in _visible_dirs(split_dir):
            images = _images_under(class_dir, skipped)
            if not images:
                empty.append((split, class_dir.name))
            label = classes.index(class_dir.name)
            samples += [Sample(p, label, split, rule(p.name)) for p in images]
    if not samples:
        raise DataError(f"{root}: no JPEG or PNG images (nor DICOM files) found under it")
    samples = with_dicom_patients(samples)
    return ChestXrayFolder(base, classes, samples, layout, empty_classes=empty, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# DICOM: the patient is the PatientID tag, kept only as a keyed hash
# ---------------------------------------------------------------------------------------------
PATIENT_SALT_ENV = "PNEUMO_PATIENT_SALT"


def with_dicom_patients(samples: list[Sample]) -> list[Sample]:
    """DICOM samples get their patient from the PatientID tag, as ``dicom-`` + a keyed hash.

    The key is derived from every PatientID of the data set (plus ``$PNEUMO_PATIENT_SALT`` when
    set): the same folder gives the same hashes on any machine, so a seeded split is reproducible
    and ``--resume`` finds it again, while a hash cannot be checked against a guessed ID without
    knowing all the folder's IDs (whoever has those has the films). A site with few patients and
    short IDs should set ``$PNEUMO_PATIENT_SALT`` to a secret. The IDs themselves are never stored.
    A DICOM without a PatientID, or unreadable, keeps the file-name rule (decoding reports it).
    """
    tags: dict[Path, str] = {}
    for s in samples:
        if s.path.suffix.lower() in IMAGE_SUFFIXES or not is_dicom(s.path):
            continue
        try:
            tags[s.path] = read_tags(s.path, ["PatientID"])["PatientID"]
        except ImageError:
            continue
    ids = sorted({v for v in tags.values() if v})
    if not ids:
        return samples
    key = hashlib.sha256("\n".join(["pneumo-patient-v1", os.environ.get(PATIENT_SALT_ENV, ""), *ids]).encode()).digest()

    def hashed(pid: str) -> str:
        return "dicom-" + hmac.new(key, pid.encode(), hashlib.sha256).hexdigest()[:16]

    return [Sample(s.path, s.label, s.split, hashed(tags[s.path])) if tags.get(s.path) else s for s in samples]


def split_by_patient(
    samples: Sequence[Sample], valid_pct: float, seed: int = 42, groups: dict[Path, str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Seeded, class-stratified split in which every patient lies wholly on one side.

    Patients are dealt per class (a patient's class is that of most of their images) until the
    validation side holds ``valid_pct`` of that class's images. ``groups`` maps files to a group
    (byte-identical copies share one, see ``cache.duplicate_groups``): every patient with a file in a
    group is dealt together with the others of that group, so no copy leaks across the split.
    """
    if not 0 < valid_pct < 1:
        raise DataError(f"valid_pct must lie between 0 and 1, got {valid_pct}")
    joined = _join_patients(samples, groups) if groups else {}
    key = lambda s: joined.get(s.patient, s.patient)  # noqa: E731
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[key(s)].append(s)
    by_class: dict[int, list[str]] = defaultdict(list)
    for pid, items in sorted(by_patient.items()):
        majority = Counter(s.label for s in items).most_common(1)[0][0]
        by_class[majority].append(pid)
    rng = random.Random(seed)
    valid_patients: set[str] = set()
    for label in sorted(by_class):
        pids = by_class[label]
        rng.shuffle(pids)
        target = valid_pct * sum(len(by_patient[p]) for p in pids)
        taken = 0
        for pid in pids:
            if taken >= target:
                break
            valid_patients.add(pid)
            taken += len(by_patient[pid])
    train = [s for s in samples if key(s) not in valid_patients]
    valid = [s for s in samples if key(s) in valid_patients]
    return train, valid


def _join_patients(samples: Sequence[Sample], groups: dict[Path, str]) -> dict[str, str]:
    """Patient -> the first (sorted) patient of the set it is joined to through shared groups."""
    parent: dict[str, str] = {}

    def root(p: str) -> str:
        while parent.get(p, p) != p:
            p = parent[p]
        return p

    first_in_group: dict[str, str] = {}
    for s in samples:
        if (group := groups.get(s.path)) is None:
            continue
        a, b = root(s.patient), root(first_in_group.setdefault(group, s.patient))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {p: root(p) for p in parent}


def split_random(samples: Sequence[Sample], valid_pct: float, seed: int = 42) -> tuple[list[Sample], list[Sample]]:
    """The tutorial's random image split. Leaks patients across sides: for comparison only."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_valid = round(valid_pct * len(samples))
    chosen = set(order[:n_valid])
    return ([s for i, s in enumerate(samples) if i not in chosen], [s for i, s in enumerate(samples) if i in chosen])


@dataclass
class Split:
    """The images to train on and to validate on, and what was decided to get them."""

    train: list[Sample]
    valid: list[Sample]
    method: str
    notes: list[str] = field(default_factory=list)


def make_split(
    data: ChestXrayFolder,
    valid_pct: float | None = None,
    method: str = "patient",
    seed: int = 42,
    keep_small_valid: bool = False,
    groups: dict[Path, str] | None = None,
) -> Split:
    """Choose train and validation images. The ``test`` split is never touched.

    A usable ``val`` folder is used as it is unless ``valid_pct`` is given; a tiny one (Kaggle's
    has 16 images) is folded into train and a patient-level split is made instead.
    """
    if method not in ("patient", "random"):
        raise DataError(f"unknown split method {method!r}: use 'patient' or 'random'")
    train, valid = data.split("train"), data.split("valid")
    notes: list[str] = []
    if valid and valid_pct is None:
        if len(valid) >= MIN_USABLE_VALID or keep_small_valid:
            return Split(train, valid, "folder", notes)
        notes.append(
            f"the 'val' folder holds only {len(valid)} images, too few to judge a model by; "
            f"folded into train and split by patient instead (--keep-val uses it as is)"
        )
    pool = train + valid
    if not pool:
        raise DataError(f"{data.root}: no training images (expected a 'train' folder or class folders)")
    pct = 0.2 if valid_pct is None else valid_pct
    if method == "random":
        notes.append(
            "random image split: images of one patient may sit on both sides, so the "
            "validation error is optimistic; use it only to compare with the tutorial"
        )
        tr, va = split_random(pool, pct, seed)
    else:
        tr, va = split_by_patient(pool, pct, seed, groups)
    return Split(tr, va, method, notes)


def patients_in_both(a: Iterable[Sample], b: Iterable[Sample]) -> set[str]:
    """Patients found on both sides: must be empty for a patient-level split."""
    return {s.patient for s in a} & {s.patient for s in b}
