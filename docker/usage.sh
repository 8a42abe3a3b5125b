#!/usr/bin/env bash
# The image's default command: what is installed, and how to train with horovodrun inside it.
set -euo pipefail

versions=$(python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
import sys

def v(*names):
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return "missing"

tf = v("tensorflow", "tensorflow-cpu")
print(f"Python {sys.version.split()[0]}, TensorFlow {tf}, Keras {v('keras')}, "
      f"Horovod {v('horovod')}, lars_tf {v('lars_tf')}")
PY
)
# The tag docker/README.md gives this flavour of the image.
image=lars-tf:gpu
if python -c 'from importlib.metadata import version; version("tensorflow-cpu")' 2>/dev/null; then
  image=lars-tf:cpu
fi
gpus=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU')
fi
np=$((gpus > 0 ? gpus : 2))

cat <<EOF
lars_tf image: $versions
Code in /opt/lars_tf (train.py, flags/, tools/, tests/), environment in /opt/venv (on PATH).
This container sees $(nproc) CPUs and $gpus GPUs. Run a command instead of this message:

  # $np processes on this host, synthetic data, a few steps
  docker run --rm $image horovodrun -np $np -H localhost:$np --gloo python train.py --synthetic \\
      --model=alexnet_bn_small --image_size=32 --num_classes=10 --synthetic_examples=$((64 * np)) \\
      --global_batch_size=$((16 * np)) --train_steps=4 --eval_steps=1 --model_dir=/tmp/smoke
  # every flag of train.py; the paper's recipes are in flags/
  docker run --rm $image python train.py --helpfull
  # ImageNet TFRecords read-only in /data, runs kept on the host, one process per GPU
  docker run --rm --gpus all --shm-size 8g -v /data/imagenet:/data:ro \\
      -v \$PWD/runs:/opt/lars_tf/runs $image horovodrun -np $np -H localhost:$np --gloo \\
      python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg --data_dir=/data

Several hosts: run "bash docker/sshd.sh 12345" in a container on each (--network host, the
shared keys mounted at /ssh-keys), then from one of them:
  horovodrun -np 16 -H host1:8,host2:8 -p 12345 --gloo python train.py ...
docker/README.md has the exact command lines.
EOF
