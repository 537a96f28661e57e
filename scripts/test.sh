#!/usr/bin/env bash
# Run the test suite. As root, inside a private network namespace so Ray, Serve and
# the test S3 server bind loopback only (docs/stack.md §8). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
cmd=".venv/bin/python -m pytest -q $*"
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c "ip link set lo up; $cmd"
fi
exec bash -c "$cmd"
