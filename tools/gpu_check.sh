#!/usr/bin/env bash
# One command for a machine with GPUs: what TensorFlow sees, NCCL all-reduce through Horovod with
# the N-worker = 1-worker check of lars_tf.distributed, ResNet-50 and AlexNet-BN train-step speed
# (mixed_float16 + XLA, images/s per GPU) and the LARS / SGD update time on the GPU.
#
#   tools/gpu_check.sh [--output_dir runs/gpu_check] [--np N] [--resnet50_batch 256] ...
#   tools/gpu_check.sh --cpu_smoke     every part on the CPU with tiny shapes (the tests run it)
#
# Writes gpu_check.json and gpu_check.md in --output_dir; exit status 0 when every part passed.
# The interpreter: $PYTHON, else that of the active virtual environment, else $VENV/bin/python
# (after `make install GPU=1 VENV=...`), else .venv/bin/python; its bin/ goes first on PATH so
# that its horovodrun is the one used. Inside the Docker image: /opt/venv, already on PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-}
for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "${VENV:+$VENV/bin/python}" .venv/bin/python; do
  [[ -z "$py" && -n "$candidate" && -x "$candidate" ]] && py=$candidate
done
py=${py:-python3}
PATH="$(dirname "$("$py" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
exec "$py" tools/gpu_check.py "$@"
