"""vispec bench: the benchmarks ship with the package; the benchmarks/ scripts are thin wrappers."""
import subprocess
import sys
from pathlib import Path

import pytest

from vispec.bench import results_dir
from vispec.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("suite", ["kernels", "linear", "e2e", "drafters"])
def test_bench_suites_are_commands(suite, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", suite, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
    wrapper = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{suite}.py"), "--help"],
                             capture_output=True, text=True, timeout=120)
    assert wrapper.returncode == 0 and "usage" in wrapper.stdout


def test_bench_linear_smoke(tmp_path):
    out = tmp_path / "linear.md"
    assert main(["bench", "linear", "--smoke", "--out", str(out)]) in (0, None)
    text = out.read_text()
    assert text.count("| SmolLM2-135M") == 4 and "speedup" in text  # 2 shapes x 2 row counts


def test_unknown_suite_and_results_folder(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2
    assert results_dir() == ROOT / "benchmarks" / "results"  # a source checkout keeps its results folder
    import vispec.bench as vb

    monkeypatch.setattr(vb, "__file__", str(tmp_path / "site" / "vispec" / "bench" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert vb.results_dir() == tmp_path / "vispec-results"  # an installed package writes beside the user


def test_topk_ceiling_counts_runs_of_sampled_tokens_in_the_targets_top_k():
    """Position p-1+j's logits predict answer token j; a run of d tokens counts only if each is in its top-k."""
    import torch
    from types import SimpleNamespace

    from vispec.bench.attention import topk_ceiling

    V, prompt = 6, 3
    answer = [1, 2, 3, 4]  # in top-2 at its position: yes, yes, no, yes
    seqs = torch.tensor([[0, 0, 0] + answer])
    logits = torch.zeros(1, seqs.shape[1], V)
    for j, (t, inside) in enumerate(zip(answer, [True, True, False, True])):
        logits[0, prompt - 1 + j, t] = 5.0 if inside else -5.0
        logits[0, prompt - 1 + j, 0] = 4.0  # one other token always in the top 2
    model = lambda **kw: SimpleNamespace(logits=logits)
    got = topk_ceiling(model, {"input_ids": seqs[:, :prompt]}, seqs, k=2, depth=3)
    assert got == [(3, 4), (1, 3), (0, 2)]


def test_drafter_attention_splits_image_and_text_keys(tmp_path):
    """bench attention on the demo VLM: EAGLE-2 sees every image token as a key, ViSpec its compressed one,
    HiViS none (its attention has no image mass at all); the masses are probabilities."""
    from vispec.bench import attention

    out = tmp_path / "att.md"
    assert attention.main(["--image-tokens", "36", "--images", "1", "--max-new", "8", "--sampled", "1",
                           "--out", str(out)]) == 0
    text = out.read_text()
    table, _, ceiling = text.partition("top-4 ceiling")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| drafter")}
    frac = [float(x) for x in next(l for l in ceiling.splitlines() if l.startswith("| ceiling")).split(" | ")[1:-1]]
    assert len(frac) == 5 and all(1 >= a >= b >= 0 for a, b in zip(frac, frac[1:]))
    keys = {k: int(v[1]) for k, v in rows.items()}
    mass = {k: float(v[3]) for k, v in rows.items()}
    assert keys == {"ViSpec": 1, "EAGLE-2": 36, "HiViS": 0}
    assert mass["HiViS"] == 0 and 0 < mass["EAGLE-2"] <= 1 and 0 < mass["ViSpec"] <= 1
