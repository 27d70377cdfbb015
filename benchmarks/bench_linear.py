"""Thin wrapper: the benchmark ships with the package as `vispec bench linear` (vispec/bench/linear.py)."""
import sys

from vispec.bench.linear import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
