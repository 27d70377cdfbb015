"""The demo VLM: SmolLM2-135M-Instruct + a small vision tower, built offline; vispec stays lossless on it."""
import random

import pytest
import torch

import vispec
from vispec.demo.model import build_demo_vlm, prompt, vision_state_dict
from vispec.demo.scenes import make_scene
from vispec.drafters import TreeConfig


@pytest.fixture(scope="module")
def demo():
    return build_demo_vlm(None)  # random vision side: the shipped weights are tested separately


def test_demo_vlm_shape_and_lossless(demo, tmp_path):
    model, proc = demo
    scenes = [make_scene(random.Random(i)) for i in range(2)]
    proc.tokenizer.padding_side = "left"
    inputs = dict(proc(text=[prompt(proc)] * 2, images=[s.image for s in scenes], return_tensors="pt", padding=True))
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])
    assert n_img == 36  # (96 / 16)^2 patches
    ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    for cls in (vispec.EagleDrafter, vispec.ViSpecDrafter, vispec.HiViSDrafter):
        out = vispec.generate(model, cls.from_target(model, seed=0), **inputs, max_new_tokens=24, tree=TreeConfig(8, 3, 3))
        assert torch.equal(out.sequences, ref), cls.__name__


def test_vision_weights_round_trip(demo, tmp_path):
    from safetensors.torch import save_file

    model, _ = demo
    state = vision_state_dict(model)
    assert state and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in state)
    save_file(state, str(tmp_path / "v.safetensors"))
    again, _ = build_demo_vlm(tmp_path / "v.safetensors")
    for k, v in vision_state_dict(again).items():
        assert torch.equal(v, state[k]), k
    bad = dict(state)
    bad["model.multi_modal_projector.extra"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit the demo VLM"):
        build_demo_vlm(tmp_path / "bad.safetensors")


def test_reading_stage_targets_and_loss(demo):
    from vispec.demo.scenes import Scene, render
    from vispec.demo.train_vision import read_loss, slot_vocab, slot_words

    model, proc = demo
    s = Scene([("red", "circle", "top left"), ("blue", "square", "bottom")], word="cat", word_place="center")
    s.image = render(s)
    words = slot_words(s)
    assert len(words) == 36
    assert words[:4] == ["red", "circle", "top", "left"]
    assert words[16:20] == ["word", "cat", "center", "center"]
    assert words[28:32] == ["blue", "square", "bottom", "bottom"]
    assert words.count("empty") == 24
    vocab = slot_vocab(proc.tokenizer)
    assert all(w in vocab[0] for w in words)
    loss, acc = read_loss(model, proc, [s, make_scene(random.Random(3))], vocab, "cpu")
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= acc <= 1.0
    assert any(p.grad is not None for p in model.model.vision_tower.parameters())
    assert model.model.language_model.embed_tokens.weight.grad is None  # the LM's rows are targets, not trained
    model.zero_grad(set_to_none=True)


def test_reading_targets_at_576_tokens_repeat_each_cells_words():
    from vispec.demo.scenes import Scene
    from vispec.demo.train_vision import slot_words

    s = Scene([("red", "circle", "top left")], word="cat", word_place="center")
    words = slot_words(s, 576)
    assert len(words) == 576
    assert words[:8] == ["red", "circle", "top", "left"] * 2 and words[63] == "left"  # cell 0 owns tokens 0..63
    assert words[4 * 64 : 4 * 64 + 4] == ["word", "cat", "center", "center"]
    assert words.count("empty") == 7 * 64
    with pytest.raises(ValueError, match="do not split into 9 cells"):
        slot_words(s, 100)


def test_train_vision_stops_at_its_time_limit_and_resumes_exactly(tmp_path):
    """A run cut by --max-minutes leaves a checkpoint; --resume finishes it and marks the weights complete."""
    from vispec.demo.model import weights_metadata
    from vispec.demo.train_vision import main

    out = tmp_path / "v.safetensors"
    base = ["--image-tokens", "36", "--read-steps", "3", "--steps", "1", "--read-batch-size", "1", "--batch-size", "1",
            "--eval", "0", "--save-every", "1", "--out", str(out)]
    assert main(base + ["--max-minutes", "0.00001"]) == 3  # stopped after its first checkpoint
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == ("1/2 read", 1) and "complete" not in weights_metadata(out)
    assert main(base + ["--resume"]) == 0
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == ("2/2 describe", 1)
    assert weights_metadata(out) == {"image_tokens": "36", "complete": "1"}
    with pytest.raises(SystemExit):  # the checkpoint is of another geometry: refused before any work
        main(base[2:] + ["--image-tokens", "576", "--resume"])
