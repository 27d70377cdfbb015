"""vispec bench: the benchmarks ship with the package; the benchmarks/ scripts are thin wrappers."""
import subprocess
import sys
from pathlib import Path

import pytest

from vispec.bench import results_dir
from vispec.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("suite", ["kernels", "e2e", "drafters"])
def test_bench_suites_are_commands(suite, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", suite, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
    wrapper = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{suite}.py"), "--help"],
                             capture_output=True, text=True, timeout=120)
    assert wrapper.returncode == 0 and "usage" in wrapper.stdout


def test_unknown_suite_and_results_folder(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2
    assert results_dir() == ROOT / "benchmarks" / "results"  # a source checkout keeps its results folder
    import vispec.bench as vb

    monkeypatch.setattr(vb, "__file__", str(tmp_path / "site" / "vispec" / "bench" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert vb.results_dir() == tmp_path / "vispec-results"  # an installed package writes beside the user


def test_drafter_attention_splits_image_and_text_keys(tmp_path):
    """bench attention on the demo VLM: EAGLE-2 sees every image token as a key, ViSpec its compressed one,
    HiViS none (its attention has no image mass at all); the masses are probabilities."""
    from vispec.bench import attention

    out = tmp_path / "att.md"
    assert attention.main(["--image-tokens", "36", "--images", "1", "--max-new", "8", "--out", str(out)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| drafter")}
    keys = {k: int(v[1]) for k, v in rows.items()}
    mass = {k: float(v[3]) for k, v in rows.items()}
    assert keys == {"ViSpec": 1, "EAGLE-2": 36, "HiViS": 0}
    assert mass["HiViS"] == 0 and 0 < mass["EAGLE-2"] <= 1 and 0 < mass["ViSpec"] <= 1
