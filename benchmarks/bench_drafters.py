"""Thin wrapper: the benchmark ships with the package as `vispec bench drafters` (vispec/bench/drafters.py)."""
import sys

from vispec.bench.drafters import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
