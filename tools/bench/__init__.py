"""The benchmarks behind `tools/bench.py` (`make bench`), one module per measurement.

- `timing`: interleaved repeated runs, medians, quartiles and paired ratios.
- `environment`: thread counts shared by every framework, the machine and the versions.
- `workloads`: the sizes of the `full`, `quick` and `smoke` modes.
- `optimizer_update` and `peers`: one update of ResNet-50's variables (part 1).
- `train_step`: training steps of AlexNet-BN and ResNet-50 on the CPU (part 2).
- `input_pipeline`: ImageNet TFRecords through the training preprocessing (part 3).
- `allreduce` and `allreduce_worker`: Horovod all-reduce across two ranks (part 4).
- `scaling`: predicted scaling efficiency from the ring all-reduce cost model (part 5).
- `report`: `docs/benchmarks.md` from the results.
"""
