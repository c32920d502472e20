"""The quality harness: KV compression methods and the guard-window attention that applies them."""
