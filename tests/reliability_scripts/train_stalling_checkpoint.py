"""`train.py` whose checkpoint write of one step stalls half-way, for a kill -9 test.

    STALL_CHECKPOINT=4 STALL_MARKER=/tmp/marker python train_stalling_checkpoint.py <flags>

Everything is the real `train.py` except one function: TensorFlow writes a checkpoint as the
variables' data into `<prefix>_temp/`, then merges them into `<prefix>.index` / `.data-*`,
then records `<prefix>` in the directory's `checkpoint` file. When the merge of
`ckpt-$STALL_CHECKPOINT` starts, this script creates `$STALL_MARKER` and sleeps instead, so
the test can kill the process while that checkpoint is half written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import app  # noqa: E402
from tensorflow.python.checkpoint import functional_saver  # noqa: E402

import train  # noqa: E402  (defines train.py's flags)

_merge = functional_saver.gen_io_ops.merge_v2_checkpoints
_STALLED = f"ckpt-{int(os.environ['STALL_CHECKPOINT'])}"


def _stalling_merge(checkpoint_prefixes, destination_prefix, *args, **kwargs):
    if os.path.basename(destination_prefix.numpy().decode()) == _STALLED:
        Path(os.environ["STALL_MARKER"]).write_text(str(os.getpid()))
        time.sleep(3600)  # until killed
    return _merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)


functional_saver.gen_io_ops.merge_v2_checkpoints = _stalling_merge

if __name__ == "__main__":
    app.run(train.main)
