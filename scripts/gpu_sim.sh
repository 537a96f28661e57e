#!/usr/bin/env bash
# SIM runs side by side on one GPU, in process (jobs/distill.py --no-ray, jobs/configs/sim-gpu.yaml).
# The Fashion-MNIST UNet is small: one run leaves most of a GPU idle, so several share it.
#   bash scripts/gpu_sim.sh MINUTES OUT_DIR NAME:"key=value ..." [NAME:"..." ...]
# Each run trains for MINUTES (train.max_minutes) into runs/NAME; OUT_DIR gets NAME.tgz (export,
# metrics.json, samples.png, config.yaml, the log) and gpu.log (nvidia-smi every 20 s). With
# WITH_CHECKPOINT=1 also the run's latest checkpoint (all state, ~31 MB for sim-gpu.yaml) as
# NAME-ckpt.tar.part-aa, -ab, ... (15 MB pieces), so a later machine can resume it:
#   cat NAME-ckpt.tar.part-* | tar xf - -C runs   # then carry runs/NAME, train.resume_from_checkpoint=latest
set -u
minutes=$1; out=$2; shift 2
py=${PYTHON:-python3}
mkdir -p "$out" runs
monitor=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 > "$out/gpu.log" 2>&1 &
  monitor=$!
fi
names=(); pids=()
for spec in "$@"; do
  name=${spec%%:*}; overrides=${spec#*:}
  # shellcheck disable=SC2086  # overrides are words
  PYTHONUNBUFFERED=1 $py jobs/distill.py --no-ray --config jobs/configs/sim-gpu.yaml run.output_dir="runs/$name" \
      train.max_minutes="$minutes" $overrides > "runs/$name.log" 2>&1 &
  names+=("$name"); pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=1; echo "run ${names[$i]} failed:"; tail -20 "runs/${names[$i]}.log"; }
  grep -E "done:|max_minutes|resumed" "runs/${names[$i]}.log"
  cp "runs/${names[$i]}.log" "runs/${names[$i]}/train.log" 2>/dev/null
  tar czf "$out/${names[$i]}.tgz" -C runs --exclude checkpoints "${names[$i]}" 2>/dev/null
  latest=$(ls -d "runs/${names[$i]}"/checkpoints/step_* 2>/dev/null | sort | tail -1)
  if [ "${WITH_CHECKPOINT:-0}" = 1 ] && [ -n "$latest" ]; then
    tar cf - -C runs "${latest#runs/}" | split -b 15M - "$out/${names[$i]}-ckpt.tar.part-"
  fi
done
[ -n "$monitor" ] && kill "$monitor" 2>/dev/null
exit $status
