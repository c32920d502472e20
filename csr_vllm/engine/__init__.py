"""CSR inside vLLM: settings, page layout, Guard pools and the attention backend."""
