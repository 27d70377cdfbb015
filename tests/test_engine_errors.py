"""vispec.generate refuses bad requests with a message naming the problem, before any work."""
import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import TreeConfig


@pytest.fixture(scope="module")
def llama():
    return T.llama(seed=1)


@pytest.fixture(scope="module")
def llava():
    return T.llava(seed=1)


def test_drafter_for_another_target(llama):
    other = T.llama(seed=2, vocab_size=200)
    drafter = vispec.EagleDrafter.from_target(other)
    with pytest.raises(ValueError, match=r"vocabulary \(200 tokens\) does not match the target's \(160\)"):
        vispec.generate(llama, drafter, **T.text_inputs([4]), max_new_tokens=4)
    wide = vispec.EagleDrafter.from_target(T.llama(seed=3, hidden_size=96, num_attention_heads=4))
    with pytest.raises(ValueError, match="hidden size 96 does not match the target's 64"):
        vispec.generate(llama, wide, **T.text_inputs([4]), max_new_tokens=4)
    twin = vispec.EagleDrafter.from_target(T.llama(seed=1))  # same shapes, another instance's embeddings
    with pytest.raises(ValueError, match="shares the embeddings of another model instance"):
        vispec.generate(llama, twin, **T.text_inputs([4]), max_new_tokens=4)


def test_unsupported_model_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="does not support GPT2LMHeadModel; supported target classes"):
        vispec.generate(gpt2, None, input_ids=torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        vispec.accelerate(gpt2, None)


def test_prompt_plus_new_tokens_beyond_positions(llama):
    d = vispec.EagleDrafter.from_target(llama)
    with pytest.raises(ValueError, match=r"exceeds the model's max_position_embeddings \(1024\)"):
        vispec.generate(llama, d, **T.text_inputs([30]), max_new_tokens=1000)


def test_image_tokens_without_pixels_and_pixels_without_tokens(llava):
    d = vispec.EagleDrafter.from_target(llava)
    inputs = T.llava_inputs([5])
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="holds 16 image tokens but no pixel_values"):
        vispec.generate(llava, d, **no_pixels, max_new_tokens=4)
    with pytest.raises(ValueError, match="no image token"):
        vispec.generate(llava, d, **T.text_inputs([5]), pixel_values=inputs["pixel_values"], max_new_tokens=4)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_beams=2), r"does not support num_beams \(beam search\)"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(foo=1), "unexpected inputs: foo"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive int"),
        (dict(pixel_values=torch.zeros(1, 3, 32, 32)), r"unexpected inputs: pixel_values \(LlamaForCausalLM: a text-only"),
        (dict(tree=(8, 3, 2)), "tree must be a vispec.TreeConfig"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), "top_k must be a non-negative int"),
        (dict(compile="fast"), "compile must be a bool or one of default, reduce-overhead"),
    ],
)
def test_bad_options(llama, kw, msg):
    d = vispec.EagleDrafter.from_target(llama)
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=msg):
        vispec.generate(llama, d, **T.text_inputs([4]), **kw)


def test_bad_inputs(llama):
    d = vispec.EagleDrafter.from_target(llama)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        vispec.generate(llama, d, input_ids=torch.tensor([[1, 500]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="one contiguous block of real tokens"):
        vispec.generate(llama, d, input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="streamers support batch size 1"):
        vispec.generate(llama, d, **T.text_inputs([3, 4]), max_new_tokens=2, streamer=object())


def test_tree_config_validation():
    with pytest.raises(ValueError, match="total_tokens=100 exceeds the 20 candidates"):
        TreeConfig(total_tokens=100, depth=2, top_k=4)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        TreeConfig(total_tokens=4, depth=0, top_k=4)


def test_eagle_checkpoint_round_trip(tmp_path, llava):
    d = vispec.EagleDrafter.from_target(llava, seed=7)
    d.save_pretrained(tmp_path / "drafter")
    assert sorted(p.name for p in (tmp_path / "drafter").iterdir()) == ["config.json", "model.safetensors"]
    back = vispec.EagleDrafter.from_pretrained(tmp_path / "drafter", llava)
    for (k, a), (k2, b) in zip(d.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert "embed_tokens" not in str(list(d.state_dict()))  # the target's weights are not saved
    inputs = T.llava_inputs([5], seed=3)
    a = vispec.generate(llava, d, **inputs, max_new_tokens=10)
    b = vispec.generate(llava, back, **inputs, max_new_tokens=10)
    assert torch.equal(a.sequences, b.sequences) and a.stats.accepted_draft_tokens == b.stats.accepted_draft_tokens
    with pytest.raises(FileNotFoundError, match="not a vispec drafter directory"):
        vispec.EagleDrafter.from_pretrained(tmp_path, llava)


def test_sliding_window_models_are_lossless_past_the_window():
    """Mistral's sliding window (every layer), decoded well past it: tree attention applies the window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**T._text_cfg().to_dict(), "sliding_window": 16})).eval()
    inputs = T.text_inputs([10, 4], seed=5)
    ref = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    out = vispec.generate(model, vispec.EagleDrafter.from_target(model), **inputs, max_new_tokens=30,
                          tree=TreeConfig(8, 3, 3))
    assert torch.equal(out.sequences, ref)


def test_what_tree_attention_cannot_do_is_refused(no_forward):
    model = T.gemma3_text(seed=0)
    d = vispec.EagleDrafter.from_target(model)
    no_forward(model)
    with pytest.raises(ValueError, match=r"tree's 41 nodes do not fit the model's sliding window \(32\)"):
        vispec.generate(model, d, **T.text_inputs([4]), max_new_tokens=4, tree=TreeConfig(40, 3, 8))
    capped = T.gemma3_text(seed=0, attn_logit_softcapping=50.0)
    no_forward(capped)
    with pytest.raises(ValueError, match="caps attention logits"):
        vispec.generate(capped, vispec.EagleDrafter.from_target(capped), **T.text_inputs([4]), max_new_tokens=4,
                        tree=TreeConfig(6, 2, 3))


@pytest.fixture
def no_forward():
    """Fails the test if any module of a model runs a forward (every check comes before the first)."""
    handles = []

    def watch(model):
        def hook(module, args):
            raise AssertionError(f"{type(module).__name__} ran a forward before the request was refused")

        handles.extend(m.register_forward_pre_hook(hook) for m in model.modules())
        return model

    yield watch
    for h in handles:
        h.remove()


def _bad_requests(model, drafter):
    """(name, call, message) of requests that must be refused before any forward."""
    ok = T.text_inputs([4])
    return [
        ("empty prompt", dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "is empty"),
        ("empty batch", dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "is empty"),
        ("float ids", dict(input_ids=torch.zeros(1, 4)), "input_ids must be an integer tensor"),
        ("nan temperature", dict(**ok, temperature=float("nan")), "temperature"),
        ("pixels to a text model", dict(**ok, pixel_values=torch.zeros(1, 3, 8, 8)), "unexpected inputs: pixel_values"),
        ("bad mask", dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]])), "contiguous"),
        ("bad tree", dict(**ok, tree=TreeConfig(8, 2, 8)), "exceeds the drafter's vocabulary"),
    ]


def test_every_bad_request_is_refused_before_any_forward(no_forward):
    model = T.llama(seed=4)
    drafter = vispec.EagleDrafter.from_target(model, seed=0)
    drafter.set_draft_vocab(range(4))  # a tree with top_k 8 cannot be drafted from 4 tokens
    no_forward(model)
    no_forward(drafter)
    for name, call, msg in _bad_requests(model, drafter):
        kw = {"max_new_tokens": 4, "tree": TreeConfig(6, 2, 3), **call}
        with pytest.raises(ValueError, match=msg):
            vispec.generate(model, drafter, **kw)


def test_drafter_in_another_dtype_is_refused_before_any_forward(no_forward):
    model = T.llama(seed=4)
    drafter = vispec.EagleDrafter.from_target(model, seed=0).to(torch.float64)
    no_forward(model)
    with pytest.raises(ValueError, match=r"drafter's weights are torch.float64 on cpu, the target's torch.float32"):
        vispec.generate(model, drafter, **T.text_inputs([4]), max_new_tokens=4)
    with pytest.raises(ValueError, match="drafter's weights are torch.float64"):
        vispec.accelerate(model, drafter)


def test_image_problems_are_refused_before_any_forward(no_forward, llava):
    d = vispec.EagleDrafter.from_target(llava)
    inputs = T.llava_inputs([5])
    no_forward(llava)
    with pytest.raises(ValueError, match="holds 16 image tokens but no pixel_values"):
        vispec.generate(llava, d, **{k: v for k, v in inputs.items() if k != "pixel_values"}, max_new_tokens=4)
    with pytest.raises(ValueError, match="unexpected inputs: image_grid_thw"):
        vispec.generate(llava, d, **inputs, image_grid_thw=torch.ones(1, 3, dtype=torch.long), max_new_tokens=4)
