"""`--import bench.harness.nomkldnn`: run torch without oneDNN (mkldnn) in the driver and every worker.

Convolutions then take ATen's own im2col + BLAS path instead of oneDNN's kernels, which round differently: one way
`python -m bench.noise` emulates another machine (the row's `cpu_kernels` column says "oneDNN off").
"""

import torch

torch.backends.mkldnn.enabled = False
