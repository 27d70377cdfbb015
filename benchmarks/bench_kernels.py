"""Thin wrapper: the benchmark ships with the package as `vispec bench kernels` (vispec/bench/kernels.py)."""
import sys

from vispec.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
