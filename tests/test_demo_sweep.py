"""The image-token sweep's report: mean and min-max over seeds per method, image-token count and temperature."""
import json

from vispec.demo.sweep import aggregate, main, plot, report


def bench(tokens, tau, speedup):
    methods = {"plain": {"tau": None, "speedup": 1.0, "same": True},
               "lookup": {"tau": None, "speedup": 0.9, "same": True},
               "vispec": {"tau": tau, "speedup": speedup, "same": True}}
    return {"image_tokens": tokens, "results": {"0": methods, "1": methods}, "prefill_frac": {}}


def test_aggregate_report_and_plot(tmp_path):
    runs = {36: [bench(36, 2.0, 1.5)], 576: [bench(576, 3.0, 2.0), bench(576, 2.0, 1.8), bench(576, 4.0, 2.6)]}
    agg = aggregate(runs)
    assert agg["0"]["vispec"][576]["tau"] == (3.0, 2.0, 4.0, 3)
    assert agg["0"]["vispec"][36]["speedup"] == (1.5, 1.5, 1.5, 1)
    assert agg["1"]["lookup"][576]["tau"] is None and "plain" not in agg["0"]
    lines = report(agg, "cpu")
    assert "| ViSpec | tau | 2.00 (2.00-2.00, 1) | 3.00 (2.00-4.00, 3) |" in lines
    plot(agg, tmp_path / "sweep.png", "cpu")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_reports_what_is_there_and_says_it_is_unfinished(tmp_path, capsys):
    (tmp_path / "36").mkdir()
    (tmp_path / "36" / "bench-seed0.json").write_text(json.dumps(bench(36, 2.0, 1.5)))
    rc = main(["--work", str(tmp_path), "--tokens", "36", "576", "--report-only", "--results", str(tmp_path / "r")])
    assert rc == 3  # 576 has no results yet
    assert (tmp_path / "r" / "demo-sweep-cpu.md").is_file() and (tmp_path / "r" / "demo-sweep-cpu.png").is_file()
    assert "2.00 (2.00-2.00, 1)" in capsys.readouterr().out
