"""Thin wrapper: the benchmark ships with the package as `vispec bench e2e` (vispec/bench/e2e.py)."""
import sys

from vispec.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
