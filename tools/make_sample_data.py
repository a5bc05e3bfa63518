"""Build the bundled sample (src/pneumo/sample_data) from the 224 px Kaggle training split.

Run once by a maintainer; kept so that the sample can be traced and rebuilt:
    python tools/make_sample_data.py ../shared/data/chest_xray_224/train
Patients are kept whole and disjoint between the sample's train and test folders.
"""

from __future__ import annotations

import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from pneumo.data.folders import kermany_patient_id, subtype_of

OUT = Path(__file__).resolve().parents[1] / "src" / "pneumo" / "sample_data" / "chest_xray"
PER_CLASS = {"train": 100, "test": 30}


def pick(files: list[Path], n: int, used: set[str], rng: random.Random) -> list[Path]:
    by_patient = defaultdict(list)
    for f in files:
        by_patient[kermany_patient_id(f.name)].append(f)
    patients = sorted(p for p in by_patient if p not in used)
    rng.shuffle(patients)
    chosen: list[Path] = []
    for p in patients:
        if len(chosen) + len(by_patient[p]) > n:
            continue
        chosen += by_patient[p]
        used.add(p)
        if len(chosen) == n:
            break
    return chosen


def main(source: str) -> None:
    rng = random.Random(0)
    src = Path(source)
    shutil.rmtree(OUT, ignore_errors=True)
    used: set[str] = set()
    for split, n in PER_CLASS.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((src / cls).glob("*.jpeg"))
            if cls == "PNEUMONIA":  # half bacterial, half viral, as a user would want to see both
                chosen = pick([f for f in files if subtype_of(f.name) == "bacteria"], n // 2, used, rng) + pick(
                    [f for f in files if subtype_of(f.name) == "virus"], n - n // 2, used, rng
                )
            else:
                chosen = pick(files, n, used, rng)
            dest = OUT / split / cls
            dest.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy2(f, dest / f.name)
            print(split, cls, len(chosen))


if __name__ == "__main__":
    main(sys.argv[1])
