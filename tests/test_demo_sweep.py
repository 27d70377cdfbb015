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


def test_one_benchmark_over_all_seeds_splits_into_one_json_per_seed(tmp_path):
    from vispec.demo.sweep import split_seeds

    m = lambda tau, sp: {"tau": tau, "speedup": sp, "same": True}  # noqa: E731
    res = {"image_tokens": 576, "prefill_frac": {"vispec@0": 0.1, "vispec@1": 0.2},
           "results": {"0": {"plain": m(None, 1.0), "lookup": m(None, 0.9), "vispec@0": m(2.0, 1.5),
                             "vispec@1": m(3.0, 1.9), "eagle-eagle3@1": m(2.5, 1.7)}}}
    split_seeds(res, [4, 7], tmp_path)
    s4 = json.loads((tmp_path / "bench-seed4.json").read_text())
    s7 = json.loads((tmp_path / "bench-seed7.json").read_text())
    assert s4["results"]["0"] == {"plain": m(None, 1.0), "lookup": m(None, 0.9), "vispec": m(2.0, 1.5)}
    assert s7["results"]["0"]["vispec"] == m(3.0, 1.9) and s7["results"]["0"]["eagle-eagle3"] == m(2.5, 1.7)
    assert s4["prefill_frac"] == {"vispec": 0.1} and s7["prefill_frac"] == {"vispec": 0.2}
    agg = aggregate({576: [s4, s7]})
    assert agg["0"]["vispec"][576]["tau"] == (2.5, 2.0, 3.0, 2)


def test_ablations_are_reported_by_what_each_changed(tmp_path):
    m = lambda tau, sp: {"tau": tau, "speedup": sp, "same": True}  # noqa: E731
    (tmp_path / "576").mkdir()
    (tmp_path / "576" / "bench-seed0.json").write_text(json.dumps(bench(576, 3.0, 2.0)))
    abl = {"image_tokens": 576, "prefill_frac": {},
           "results": {"0": {"plain": m(None, 1.0), "vispec@0": m(3.0, 2.0), "vispec@1": m(2.5, 1.8),
                             "hivis@2": m(2.2, 1.6)}}}
    (tmp_path / "576" / "bench-ablations.json").write_text(json.dumps(abl))
    rc = main(["--work", str(tmp_path), "--tokens", "576", "--seeds", "0", "--report-only", "--results",
               str(tmp_path / "r"), "--ablations", "vispec-no-global", "hivis-residuals"])
    assert rc == 0
    text = (tmp_path / "r" / "demo-sweep-cpu.md").read_text()
    assert "| 0 | ViSpec | seed 0 | 3.00 | 2.00x |" in text
    assert "| 0 | ViSpec | ViSpec without the global feature | 2.50 | 1.80x |" in text
    assert "| 0 | HiViS | HiViS with 4 step residuals | 2.20 | 1.60x |" in text
