"""bench e2e --suite demo --journal: a long run kept in units, resumed where it stopped, refused under other
settings; and the Journal it is built on."""
import json

import pytest

from vispec.bench.e2e import main
from vispec.journal import Journal

TINY = ["--suite", "demo", "--image-tokens", "36", "--images", "1", "--max-new", "8", "--depth-sweep", "0",
        "--prefill-pairs", "1"]  # the 36-token demo VLM: the journal is the subject, not the model


def test_journal_refuses_other_settings_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path, {"a": 1, "t": (1, 2)})
    j.add([{"key": "x", "v": 1}, {"key": "y", "v": 2}])
    j.add([{"key": "x", "v": 99}])  # a key it holds: kept as it was
    with open(path, "a") as f:
        f.write('{"key": "z", "v"')  # killed mid-append
    again = Journal(path, {"a": 1, "t": [1, 2]})
    assert {k: e["v"] for k, e in again.entries.items()} == {"x": 1, "y": 2}
    again.add([{"key": "z", "v": 3}])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]] == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"other settings.*'a': \(1, 2\)"):
        Journal(path, {"a": 2, "t": [1, 2]})
    path.write_text('{"key": "x"}\n')
    with pytest.raises(ValueError, match="first line"):
        Journal(path, {})


def run(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_demo_run_resumes_from_its_journal(tmp_path, monkeypatch):
    import functools

    import vispec.demo

    # The demo VLM loaded once for the four runs below (generation leaves it as it was).
    monkeypatch.setattr(vispec.demo, "build_demo_vlm", functools.lru_cache(vispec.demo.build_demo_vlm))
    journal, out = tmp_path / "run.jsonl", tmp_path / "r.md"
    argv = TINY + ["--journal", str(journal), "--out", str(out), "--json", str(tmp_path / "r.json")]
    # Stopped before its first unit: exit 3, nothing measured, the journal holds only its settings.
    assert run(argv + ["--max-minutes", "1e-9"]) == 3
    assert len(journal.read_text().splitlines()) == 1 and not out.exists()
    main(argv)
    first = json.loads((tmp_path / "r.json").read_text())
    # Facts are kept per prompt (one scene: the first prompt's only), and the report names each.
    from vispec.demo import PROMPTS

    assert list(first["facts"]) == list(PROMPTS) and first["facts"][PROMPTS[0]][1] > 0
    assert all(f == [0, 0] for q, f in first["facts"].items() if q != PROMPTS[0])
    assert f'per prompt: "{PROMPTS[0]}"' in out.read_text()
    lines = journal.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines[1:]]
    assert keys == ["pair/0/0", "pair/1/0", "prefill/vispec", "prefill/eagle", "prefill/hivis"]
    # Keep the first unit (marked) and a cut line: the rerun must read the kept one as it is and measure only
    # the others.
    kept = [json.loads(line) for line in lines[:2]]
    kept[1]["value"]["methods"]["vispec"]["accepted"] += 1000
    journal.write_text("".join(json.dumps(x) + "\n" for x in kept) + lines[2][:20])
    main(argv)
    second = json.loads((tmp_path / "r.json").read_text())
    units = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    steps = sum(u["value"]["methods"]["vispec"]["steps"] for u in units if u["key"].startswith("pair/0/"))
    assert second["results"]["0"]["vispec"]["tau"] == pytest.approx(first["results"]["0"]["vispec"]["tau"] + 1000 / steps)
    for t in ("0", "1"):
        for m in ("eagle", "hivis"):  # the units run again give the same acceptance (fixed seeds)
            assert second["results"][t][m]["tau"] == pytest.approx(first["results"][t][m]["tau"])
    assert second["results"]["1"]["vispec"]["tau"] == pytest.approx(first["results"]["1"]["vispec"]["tau"])
    assert len(journal.read_text().splitlines()) == 1 + 5
    # Other settings: refused before any measurement, naming what differs.
    with pytest.raises(ValueError, match="max_new"):
        main([("9" if a == "8" else a) for a in argv])


def test_demo_tree_sweep_reports_every_shape_per_drafter(tmp_path):
    out = tmp_path / "r.md"
    main(TINY + ["--temperatures", "0", "--prefill-pairs", "0", "--tree-sweep", "1", "--sweep-trees", "6,4,2", "5,5,1",
                 "--journal", str(tmp_path / "j.jsonl"), "--out", str(out)])
    text = out.read_text()
    section = text[text.index("## speedup against tree shape"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "tree (total" not in line]
    assert len(rows) == 3 * 2 and all(r.endswith("| yes |") for r in rows)  # 3 drafters x 2 shapes, all identical
    assert "| (6, 4, 2) |" in section and "| (5, 5, 1) |" in section
    keys = [json.loads(line).get("key") for line in (tmp_path / "j.jsonl").read_text().splitlines()[1:]]
    assert "tree_sweep" in keys
    with pytest.raises(SystemExit):
        main(TINY + ["--tree-sweep", "1", "--sweep-trees", "5,5"])
