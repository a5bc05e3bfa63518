"""What the out-of-scope check (infer/scope.py) flags, on groups of films a model never trained on.

    python bench/scope.py RUN [--out bench/results/scope.json]

RUN is a finished run folder of chest_xray_224/train. Its validation films (split.json) give the
scope statistics exactly as training.finish fits them (seed from config.json); then every group is
measured: the 16 full-resolution originals, each named shift of them (data/shifts.py), the 5 shared
DICOM films (tags and distance), and non-X-ray pictures from scikit-image. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from common import SHARED_DATA, write_report
from pneumo.data.cache import decode_images
from pneumo.data.imaging import open_image, prepare
from pneumo.data.shifts import SHIFTS
from pneumo.infer.model_folder import load_model
from pneumo.infer.scope import dicom_reasons, fit_feature_scope, scope_features

PHOTOS = ["chelsea", "astronaut", "camera", "coffee", "rocket", "text", "moon", "page"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.run / "model")
    size = model.meta.image_size
    seed = json.loads((args.run / "config.json").read_text()).get("seed", 42)
    valid = [Path(p) for p in json.loads((args.run / "split.json").read_text())["valid"]]
    decoded = decode_images(valid, size, progress=False, use_cache=False)
    scope = fit_feature_scope(scope_features(model, np.asarray(decoded.pixels)[decoded.ok]), seed)

    def ratios(pixels: list[np.ndarray]) -> list[float]:
        return [round(float(r), 3) for r in scope.distances(scope_features(model, np.stack(pixels))) / scope.threshold]

    full = sorted((SHARED_DATA / "chest_xray_fullres_sample").rglob("*.jpeg"))
    groups: dict[str, dict] = {"fullres_originals": {"ratios": ratios([prepare(p, size) for p in full])}}
    for name, shift in SHIFTS.items():
        groups[f"shift:{name}"] = {"ratios": ratios([prepare(shift(open_image(p)), size) for p in full])}
    dicoms = sorted((SHARED_DATA / "dicom").glob("*.dcm"))
    groups["dicom"] = {
        "files": [p.name for p in dicoms],
        "ratios": ratios([prepare(p, size) for p in dicoms]),
        "tag_reasons": [dicom_reasons(p) for p in dicoms],
    }
    groups["photos"] = {
        "files": PHOTOS,
        "ratios": ratios([prepare(Image.fromarray(getattr(skdata, n)()), size) for n in PHOTOS]),
    }
    for g in groups.values():
        g["flagged_by_distance"] = sum(r > 1 for r in g["ratios"])
        g["n"] = len(g["ratios"])
    result = {
        "run": str(args.run),
        "valid_films": int(decoded.ok.sum()),
        "threshold": scope.threshold,
        "valid_flagged_heldout": int((scope.valid_distances > scope.threshold).sum()),
        "groups": groups,
    }
    write_report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
