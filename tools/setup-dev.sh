#!/usr/bin/env bash
# Development set-up: PyTorch, sam2flow with its test and Ray extras, and Meta's `sam2` package (the
# reference implementation the parity tests and benchmarks compare against).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# [test]: pytest, the reference's dependencies, and the linters .ci/run runs (ruff, import-linter);
# [ray]: Ray Data and Serve for tests/test_ray.py (without it those tests are skipped).
python -m pip install -q -e ".[test,ray]"
# sam2 builds against the installed torch; its CUDA extension is optional and skipped.
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation "sam2==1.1.0"
