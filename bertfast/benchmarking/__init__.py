"""Benchmarks for bertfast: the pieces shared by ``bench/``, ``bertfast bench`` and perf CI.

timing      one call at a time between CUDA events, L2 flushed, inputs rotated; medians
device      device name and slug, versions, commit; peaks measured in the same run
formulas    FLOPs and the fewest bytes each op must move
shapes      benchmark sizes (BERT-large on a GPU, tiny without one) and padding
cases       a case (impl x op/model x size), running it into a result row
kernels     kernel-level cases: each op on each backend against PyTorch
models      model-level cases: BERT forward and training, bertfast against Hugging Face
schema      the result file: validation, reading, writing
suite       one run of the pytest-benchmark suites in bench/
render      README.md and PNG plots of a results folder   (python -m bertfast.benchmarking.render)
compare     regression check of a run against a stored one (python -m bertfast.benchmarking.compare)
command     ``bertfast bench``
"""
