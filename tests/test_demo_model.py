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
    return build_demo_vlm(None, image_tokens=36)  # random 36-token vision side (fast): the shipped weights are tested separately


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
    loss, acc, filled = read_loss(model, proc, [s, make_scene(random.Random(3))], vocab, "cpu")
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= acc <= 1.0 and 0.0 <= filled <= 1.0
    assert any(p.grad is not None for p in model.model.vision_tower.parameters())
    assert model.model.language_model.embed_tokens.weight.grad is None  # the LM's rows are targets, not trained
    model.zero_grad(set_to_none=True)


def test_reading_loss_weights_empty_cells(demo):
    """empty_weight=1 is the plain mean over all slots; 0 the mean over the slots of occupied cells only."""
    from vispec.demo.scenes import Scene, render
    from vispec.demo.train_vision import EMPTY, read_loss, slot_vocab, slot_words

    model, proc = demo
    s = Scene([("red", "circle", "top left")], word="cat", word_place="center")
    s.image = render(s)
    vocab = slot_vocab(proc.tokenizer)
    index = {w: i for i, w in enumerate(vocab[0])}
    target = torch.tensor([index[w] for w in slot_words(s)])
    with torch.no_grad():
        pixels = proc.image_processor([s.image], return_tensors="pt")["pixel_values"]
        feats = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output).float()[0]
        rows = model.get_input_embeddings().weight[vocab[1]]
        ce = torch.nn.functional.cross_entropy(feats @ rows.T, target, reduction="none")
        mse = (feats - rows[target]).pow(2).sum(-1)
        per_slot = ce + 0.1 * mse
        filled = target != index[EMPTY]
        full, only_filled = read_loss(model, proc, [s], vocab, "cpu", 1.0)[0], read_loss(model, proc, [s], vocab, "cpu", 0.0)[0]
    torch.testing.assert_close(full, per_slot.mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(only_filled, per_slot[filled].mean(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, only_filled)


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


def test_train_vision_init_fine_tunes_both_stages_from_given_weights(tmp_path):
    """--init starts stage 1 and 2 from a weights file (not from random, not skipping stage 1); bad values of
    --init and --empty-weight are refused before any work."""
    from safetensors.torch import load_file

    from vispec.demo.train_vision import main

    first = tmp_path / "a.safetensors"
    base = ["--image-tokens", "36", "--read-steps", "1", "--steps", "0", "--read-batch-size", "1", "--batch-size", "1",
            "--eval", "0", "--save-every", "1"]
    assert main(base + ["--read-lr", "0", "--out", str(first)]) == 0  # lr 0: the random start, saved
    from safetensors.torch import save_file

    moved = {k: v + 0.25 if v.is_floating_point() else v for k, v in load_file(str(first)).items()}
    init = tmp_path / "init.safetensors"
    save_file(moved, str(init), metadata={"image_tokens": "36"})
    out = tmp_path / "b.safetensors"
    assert main(base + ["--read-lr", "0", "--init", str(init), "--empty-weight", "0.2", "--out", str(out)]) == 0
    ckpt = torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == ("1/2 read", 1)  # stage 1 ran; --steps 0 skipped stage 2
    got = load_file(str(out))
    assert all(torch.equal(got[k], moved[k]) for k in moved)  # lr 0 from --init: its weights, not the random start
    for bad in (["--init", str(tmp_path / "none.safetensors")], ["--empty-weight", "1.5"]):
        with pytest.raises(SystemExit):
            main(base + ["--out", str(tmp_path / "d.safetensors")] + bad)
    assert not (tmp_path / "d.safetensors").exists()
