"""``python -m csr_vllm.native build``: compile the native CPU kernels (the set-up runs it)."""

from __future__ import annotations

import argparse
import sys

from csr_vllm import native


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m csr_vllm.native")
    parser.add_argument("command", choices=["build"], help="compile the kernels into the cache")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if native.load(verbose=args.verbose) is None:
        print(f"native CPU kernels: not built ({native.error()}); csr-vllm will use the "
              "PyTorch reference", file=sys.stderr)
        return 1
    print(f"native CPU kernels: built in {native.build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
