"""What ``bertfast bench`` runs: the case layer and the timer, shared with the suite in ``bench/``.

timing      kernels by device time (profiler), model calls between CUDA events; medians
device      device name and slug, versions, commit; peaks measured in the same run
formulas    FLOPs and the fewest bytes each op must move
shapes      benchmark sizes (BERT-large on a GPU, tiny without one) and padding
cases       a case (impl x op/model x size), running it into a result row; interleaved rounds
models      model-level cases: BERT forward and training, bertfast against Hugging Face
schema      the result file: validation, reading, writing
command     ``bertfast bench``

The pytest-benchmark suite, first light, kernel cases, render and compare live in ``bench/``;
the GPU-lab tools (compile check, Triton cache, stand-in driver, launch-everything) in ``tools/gpu/``.
"""
