"""The kernels that apply one step: eager (the ground truth), multi-tensor, compiled, Triton.

* :mod:`~metaoptimize._kernels.eager`: one parameter at a time, readable; every other kernel
  is tested against it in float64.
* :mod:`~metaoptimize._kernels.foreach`: a param group's tensors at once (the CUDA default).
* :mod:`~metaoptimize._kernels.compiled`: the eager kernel compiled by ``torch.compile``
  (``fused=True``).
* :mod:`~metaoptimize._kernels.triton`: hand-written Triton kernels for the AdamW and Lion
  bases (``fused=True`` on CUDA).
"""
