"""What csr-vllm adds to vLLM's own OpenAI-compatible server (installed as ``csr_vllm.server``).

``vllm serve MODEL --kv-cache-backend csr`` runs vLLM's FastAPI server unchanged; this package
is a vLLM *endpoint plugin* (entry point ``vllm.endpoint_plugins: csr_vllm_server``) that adds

* ``GET /csr/stats``: the CSR cache as the workers see it (preset, dictionary, bytes per token
  against the dense equivalent, token capacity against bf16, Guard and sampled-atom occupancy,
  encode time, sampled reconstruction error), and
* ``csr:`` Prometheus metrics on vLLM's ``/metrics``, next to ``vllm:``.

Worker-side numbers come from the workers through ``collective_rpc("csr_stats")`` (the worker
method the general plugin installs); nothing is estimated in the API process. Modules:
``aggregate`` (worker dicts -> one report, pure), ``metrics`` (the Prometheus side) and
``plugin`` (routes, API-key check, refreshing the metrics when /metrics is scraped).
"""
