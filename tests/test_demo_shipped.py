"""What the package ships for the demo: trained vision weights, three trained drafters, the `vispec demo` command."""
import random

import pytest
import torch

import vispec
from vispec.cli import main
from vispec.demo import DEMO_TREE, DRAFTER_KINDS, EVAL_SEED, PROMPTS, build_demo_vlm, demo_tree, load_demo_drafter, prompt
from vispec.demo.model import scene_size
from vispec.demo.scenes import make_scene, score
from vispec.drafters import TreeConfig


@pytest.fixture(scope="module")
def demo():
    return build_demo_vlm()


def held_out(model, proc, n, offset=0):
    scenes = [make_scene(random.Random(EVAL_SEED + offset + i), size=scene_size(model)) for i in range(n)]
    return scenes, [dict(proc(text=[prompt(proc, PROMPTS[i % len(PROMPTS)])], images=[s.image], return_tensors="pt"))
                    for i, s in enumerate(scenes)]


def test_answers_depend_on_the_image(demo):
    """The shipped vision weights make the model describe held-out scenes mostly right (random ones: ~10%)."""
    model, proc = demo
    scenes, inputs = held_out(model, proc, 8, offset=200)
    good = total = 0
    answers = set()
    for s, inp in zip(scenes, inputs):
        out = model.generate(**inp, max_new_tokens=64, do_sample=False)
        text = proc.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.add(text)
        g, t = score(text, s)
        good, total = good + g, total + t
    assert len(answers) == len(scenes)  # not one fixed description
    assert good / total > 0.6, (good, total)


@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_shipped_drafters_are_trained_and_lossless(demo, kind):
    model, proc = demo
    d = load_demo_drafter(kind, model)
    assert d.drafter_type() == kind and d.config.draft_vocab_size > 0
    tree = TreeConfig(*DEMO_TREE)
    _, inputs = held_out(model, proc, 3, offset=300)
    acc = steps = 0
    for inp in inputs:
        ref = model.generate(**inp, max_new_tokens=48, do_sample=False)
        out = vispec.generate(model, d, **inp, max_new_tokens=48, tree=tree)
        assert torch.equal(out.sequences, ref)
        acc, steps = acc + out.stats.accepted_draft_tokens, steps + out.stats.row_steps
    assert acc / steps > 1.0  # an untrained drafter accepts ~0 per step
    sampled = vispec.generate(model, d, **inputs[0], max_new_tokens=16, tree=TreeConfig(*demo_tree(1.0)),
                              temperature=1.0, seed=3)
    assert sampled.sequences.shape[1] > inputs[0]["input_ids"].shape[1]


def test_demo_command(capsys):
    assert main(["demo", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "speedup" in out and "tau" in out
    assert main(["demo", "--max-new-tokens", "12", "--temperature", "1", "--drafter", "hivis",
                 "--prompt", "What do you see in this picture?"]) == 0
    assert "sampled" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--image", "/nonexistent.png"], "cannot read image"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--tree", "100", "2", "2"], "--tree"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_demo_command_rejects_bad_input_before_loading(capsys, argv, msg):
    assert main(["demo", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_train_refuses_a_draft_vocabulary_with_init(capsys, tmp_path):
    assert main(["train", "--model", "demo", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--init", str(tmp_path / "i"), "--draft-vocab", "64"]) == 2
    assert "--draft-vocab applies to a new drafter" in capsys.readouterr().err


def test_build_drafters_reproduces_the_pipeline(tmp_path, capsys):
    """The script behind the shipped drafters runs end to end (tiny sizes) and honours --num-q; its answers go
    to --answers, and a re-run trains nothing that is saved and summarised already."""
    import json

    from vispec.demo import build_drafters

    out = tmp_path / "weights"
    argv = ["--work", str(tmp_path / "work"), "--image-tokens", "36", "--samples", "2", "--sampled", "2", "--max-new-tokens", "8",
            "--epochs", "1", "--stage2-epochs", "1", "--stage2-lr", "1e-4", "--draft-vocab-coverage", "0.99",
            "--eval-samples", "1", "--kinds", "vispec", "--num-q", "3", "--out", str(out), "--answers", str(tmp_path / "a")]
    build_drafters.main(argv)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["answers-greedy.jsonl", "answers-sampled.jsonl"]
    assert all(len(p.read_text().splitlines()) == 3 for p in (tmp_path / "a").iterdir())  # settings + 2 answers
    saved = (out / "vispec" / "model.safetensors").stat().st_mtime_ns
    build_drafters.main(argv)
    assert "vispec: already trained" in capsys.readouterr().out
    assert (out / "vispec" / "model.safetensors").stat().st_mtime_ns == saved
    config = json.loads((out / "vispec" / "config.json").read_text())
    assert config["drafter_type"] == "vispec" and config["num_q"] == 3
    assert 0 < config["draft_vocab_size"] <= 2 * 8 + 2  # the answers' tokens (+ EOS ids), not the 49k vocabulary
    summary = json.loads((tmp_path / "work" / "seed-0" / "summary.json").read_text())
    assert [(s, e) for s, e, _ in summary["vispec"]] == [(1, 1), (2, 1)]  # stage 1, then ViSpec's stage 2
    assert summary["coverage"]["sampled"] >= 0.99 and set(summary["coverage"]) == {"greedy", "sampled"}


@pytest.mark.parametrize("bad", [["--num-q", "0"], ["--epochs", "0"], ["--draft-vocab", "-1"], ["--sampled", "-1"],
                                 ["--draft-vocab-coverage", "1.5"], ["--vision-weights", "/nonexistent"]])
def test_build_drafters_refuses_bad_sizes(tmp_path, bad, capsys):
    from vispec.demo import build_drafters

    with pytest.raises(SystemExit) as e:
        build_drafters.main(["--work", str(tmp_path)] + bad)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_demo_command_drafts_on_the_tree_for_its_temperature(monkeypatch, temperature):
    """Greedy on the deep tree, sampled on the wide, shallow one (a wrong choice costs speed, not output)."""
    import vispec.cli

    seen = {}

    def speculate(model, tokenizer, drafter, inputs, label, args, tree, compare):
        seen["tree"] = tree
        return 0

    monkeypatch.setattr(vispec.cli, "_speculate_and_compare", speculate)
    assert main(["demo", "--temperature", str(temperature), "--max-new-tokens", "1"]) == 0
    assert tuple(vars(seen["tree"]).values()) == demo_tree(temperature)
    assert demo_tree(1.0) != DEMO_TREE == demo_tree(0.0)
