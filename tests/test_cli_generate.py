"""`vispec generate`: a user's own checkpoint directory and drafter, streamed, compared with generate."""
import pytest
import torch

import vispec
from vispec.cli import main
from vispec.testing import tiny_llava_and_processor, tiny_tokenizer


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    import tiny_models as T

    root = tmp_path_factory.mktemp("text")
    model = T.llama(seed=3, vocab_size=len(tiny_tokenizer()))
    model.generation_config.eos_token_id = None
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    vispec.EagleDrafter.from_target(model, seed=0).save_pretrained(root / "drafter")
    return root


@pytest.fixture(scope="module")
def vlm_ckpt(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm")
    model, processor = tiny_llava_and_processor()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    vispec.ViSpecDrafter.from_target(model, seed=0).save_pretrained(root / "drafter")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(root / "b.png")
    return root


def test_generate_text_model_compare_is_identical(text_ckpt, capsys):
    rc = main(["generate", "--model", str(text_ckpt / "model"), "--drafter", str(text_ckpt / "drafter"),
               "--prompt", "t5 t17 t99", "--max-new-tokens", "10", "--tree", "6", "2", "3", "--compare"])
    out = capsys.readouterr().out
    assert rc == 0 and "identical" in out and "speedup" in out and "tau" in out


def test_generate_vlm_two_images_and_sampling(vlm_ckpt, capsys):
    base = ["generate", "--model", str(vlm_ckpt / "model"), "--drafter", str(vlm_ckpt / "drafter"),
            "--image", str(vlm_ckpt / "a.png"), "--image", str(vlm_ckpt / "b.png"), "--prompt", "t3 t4"]
    assert main(base + ["--max-new-tokens", "8", "--compare"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(base + ["--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    assert "target forwards" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [
    (["--prompt", " "], "--prompt is empty"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-1"], "--top-k must be a non-negative int"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--tree", "100", "2", "4"], "--tree: TreeConfig.total_tokens=100"),
    (["--image", "/nonexistent.png"], "cannot read image /nonexistent.png"),
])
def test_generate_refuses_bad_options_before_loading(text_ckpt, capsys, monkeypatch, extra, msg):
    import vispec.cli as cli

    monkeypatch.setattr(cli, "load_target", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["generate", "--model", str(text_ckpt / "model"), "--drafter", str(text_ckpt / "drafter"), "--prompt", "t5"]
    assert main(argv + extra) == 2
    assert msg.replace("\\", "") in capsys.readouterr().err or pytest.fail(msg)


def test_generate_refuses_missing_dirs_and_images_for_a_text_model(text_ckpt, vlm_ckpt, capsys):
    model, drafter = str(text_ckpt / "model"), str(text_ckpt / "drafter")
    assert main(["generate", "--model", str(text_ckpt), "--drafter", drafter, "--prompt", "t5"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--drafter", model, "--prompt", "t5"]) == 2
    assert "is not a vispec drafter directory" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--drafter", drafter, "--prompt", "t5",
                 "--image", str(vlm_ckpt / "a.png")]) == 2
    assert "text-only model" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--drafter", str(vlm_ckpt / "drafter"), "--prompt", "t5"]) == 2
    assert "--drafter" in capsys.readouterr().err
