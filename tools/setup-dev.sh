#!/usr/bin/env bash
# Development set-up: PyTorch, sam2flow with its test and Ray extras, and Meta's `sam2` package (the
# reference implementation the parity tests and benchmarks compare against).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# [test]: pytest, the reference's dependencies, and the linters .ci/run runs (ruff, import-linter);
# [ray]: Ray Data and Serve for tests/test_ray.py (without it those tests are skipped);
# [label-studio]: label-studio-sdk, whose brush RLE the Label Studio backend answers in.
python -m pip install -q -e ".[test,ray,label-studio]"
# sam2 builds against the installed torch; its CUDA extension is optional and skipped.
SAM2_BUILD_CUDA=0 python -m pip install -q --no-build-isolation "sam2==1.1.0"
# Headless Chromium and its driver for tests/test_page.py (the labelling page in a real browser), from the
# operating system's packages: nothing is downloaded at test time. Only where apt-get exists and they are missing.
if command -v apt-get >/dev/null && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi
# Label Studio itself for tests/test_label_studio.py, in its own virtual environment (its pins are not ours):
# made once, about 1 GB and two minutes; the test finds it at .venv-label-studio (or $SAM2FLOW_LABEL_STUDIO_VENV).
if [ ! -x .venv-label-studio/bin/label-studio ]; then
    python -m venv .venv-label-studio
    .venv-label-studio/bin/python -m pip install -q "label-studio==1.23.2"
fi
