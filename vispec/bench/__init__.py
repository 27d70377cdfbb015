"""Benchmarks shipped with the package: ``vispec bench kernels | linear | e2e | drafters | attention [options]`` (the scripts
under ``benchmarks/`` in a source checkout are thin wrappers of these modules)."""
from __future__ import annotations

from pathlib import Path

SUITES = ("kernels", "linear", "e2e", "drafters", "attention")


def results_dir() -> Path:
    """Where result tables and plots go by default: the checkout's ``benchmarks/results`` when vispec runs
    from a source tree, else ``./vispec-results`` (an installed package has no benchmarks folder)."""
    repo = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return repo if repo.is_dir() else Path.cwd() / "vispec-results"


def device_label(device=None) -> str:
    """The device's name as result files carry it: the GPU's name (``device``, default the current one), else
    "cpu", with characters other than letters, digits and ``._-`` replaced by "-"."""
    import torch

    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def main(suite: str, argv: list[str]) -> int:
    import importlib

    if suite not in SUITES:
        raise SystemExit(f"unknown benchmark {suite!r}; choose from {', '.join(SUITES)}")
    rc = importlib.import_module(f"vispec.bench.{suite}").main(argv)
    return int(rc or 0)
