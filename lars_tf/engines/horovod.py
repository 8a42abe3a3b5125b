"""The Horovod engine (the default): one process per device under `horovodrun`.

    horovodrun -np 8 -H host1:4,host2:4 python train.py --engine=horovod ...

Everything goes through `lars_tf.distributed`, the Keras 3 layer over `horovod.tensorflow`
(Horovod's own Keras parts are broken under Keras 3): gradients averaged once per update,
with optional scaled float16 compression; rank 0's state broadcast after a restore; one
scalar all-reduce per batch for the stop decision.
"""

from __future__ import annotations

from typing import Any

from lars_tf import distributed
from lars_tf.engines.base import Engine


class HorovodEngine(Engine):
    name = "horovod"

    def __init__(self) -> None:
        distributed.init()

    @property
    def processes(self) -> int:
        return distributed.size()

    @property
    def rank(self) -> int:
        return distributed.rank()

    def configure(self, threads_per_worker: int = 0) -> None:
        distributed.pin_gpu()
        distributed.configure_threads(threads_per_worker or None)

    def check(self, *, xla: bool, fp16_allreduce: bool, **options: Any) -> None:
        if xla and self.processes > 1:
            raise ValueError(
                f"--xla cannot be used with {self.processes} Horovod workers: Horovod's "
                "all-reduce has no XLA kernel in this build; run without --xla"
            )

    def prepare_optimizer(self, optimizer, compression=None):
        return distributed.distribute_optimizer(optimizer, compression=compression)

    def broadcast(self, model, optimizer) -> None:
        distributed.broadcast_model_and_optimizer(model, optimizer)
        distributed.broadcast_seed_draws(model)

    def run_on_root(self, function, what):
        return distributed.run_on_root(function, what)

    def allreduce_max(self, value, name="lars_tf_max"):
        return distributed.allreduce_max(value, name)

    def allreduce_sum(self, values, name="lars_tf_sum"):
        return distributed.allreduce_sum(values, name)

    def average_logs(self, logs, name="lars_tf_logs"):
        return distributed.average_logs(logs, name)

    def average_model_state(self, model) -> None:
        distributed.average_model_state(model)

    def replica_mismatches(self, variables):
        return distributed.replica_mismatches(variables)
