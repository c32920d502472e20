"""GPU kernels (Triton) for the CSR KV cache, each with a validating launcher and a plain
PyTorch reference beside it (:mod:`csr_vllm.ops.reference`).

* :mod:`csr_vllm.ops.encode`: fused encode + store (MP / OMP pursuit, packed slots written at
  ``slot_mapping``).
* :mod:`csr_vllm.ops.sparse_decode`: paged decode attention in the sparse domain (split-K,
  exact tail for the Guard window and in-flight tokens).
* :mod:`csr_vllm.ops.reconstruct`: packed pages -> dense pages (the prefill read path).
* :mod:`csr_vllm.ops.library`: ``torch.library.custom_op`` registrations with fake impls.

Only torch and triton are imported here (no vLLM, no safetensors), so the kernels and
``benchmarks/kernels`` run on a machine that has nothing else. Without a CUDA device the kernels
run under Triton's interpreter (:mod:`csr_vllm.ops._triton`).
"""
