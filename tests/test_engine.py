"""Losslessness of vispec.generate on tiny random-weight targets (fp32, CPU)."""
import pytest
import torch

import tiny_models as T
import vispec
from vispec.drafters import OracleDrafter, TreeConfig

TARGETS = {
    "llama": (T.llama, T.text_inputs),
    "llava": (T.llava, T.llava_inputs),
    "llava_next": (T.llava_next, T.llava_next_inputs),
    "qwen2_vl": (T.qwen2_vl, T.qwen_inputs),
    "qwen2_5_vl": (T.qwen2_5_vl, T.qwen_inputs),
    "qwen3_vl": (T.qwen3_vl, T.qwen_inputs),
    "llava_onevision": (T.llava_onevision, lambda lens, **kw: T.llava_onevision_inputs(lens, videos=False, **kw)),
    "idefics3": (T.idefics3, T.idefics3_inputs),
    "gemma3": (T.gemma3, T.gemma3_inputs),
    "gemma3_text": (T.gemma3_text, T.text_inputs),
    "smolvlm": (T.smolvlm, T.idefics3_inputs),
    "qwen2": (T.qwen2_text, T.text_inputs),
    "mistral": (T.mistral_text, T.text_inputs),
}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request):
    build, make_inputs = TARGETS[request.param]
    return request.param, build(), make_inputs


def hf_greedy(model, inputs, max_new_tokens, **kw):
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kw)


def oracle_for(model, inputs, ref, acceptance=1.0, depth=3, width=3, seed=0):
    cont = ref[:, inputs["input_ids"].shape[1]:]
    vocab = model.get_input_embeddings().weight.shape[0]
    tree = TreeConfig(total_tokens=depth * width, depth=depth, top_k=width)
    return OracleDrafter(cont, vocab, acceptance=acceptance, width=width, seed=seed), tree


@pytest.mark.parametrize("lens", [[7], [5, 12, 2, 9]], ids=["b1", "b4-padded"])
def test_greedy_untrained_eagle(target, lens):
    name, model, make_inputs = target
    inputs = make_inputs(lens, seed=len(lens))
    ref = hf_greedy(model, inputs, 24)
    drafter = vispec.EagleDrafter.from_target(model, seed=0)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=24, tree=TreeConfig(10, 3, 4))
    assert torch.equal(out.sequences, ref)
    assert out.stats.target_forwards >= 1 and out.stats.new_tokens == ref[:, inputs["input_ids"].shape[1]:].numel()


@pytest.mark.parametrize("acceptance", [1.0, 0.6])
def test_greedy_oracle_drafter(target, acceptance):
    name, model, make_inputs = target
    inputs = make_inputs([6, 10, 3], seed=3)
    ref = hf_greedy(model, inputs, 30)
    drafter, tree = oracle_for(model, inputs, ref, acceptance=acceptance)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=30, tree=tree)
    assert torch.equal(out.sequences, ref)
    if acceptance == 1.0:
        # every forward accepts the whole chain (depth 3) except where the answer runs out
        assert out.stats.tau > 2.5
        assert out.stats.target_forwards <= 30 // 4 + 1
    else:
        assert 0.3 < out.stats.tau < 2.5


def test_compiled_tree_forward_is_token_identical():
    """compile=True: the verification forward under torch.compile (a recompile makes the growing cache length
    dynamic); greedy output still equals model.generate's, on a second request (new cache, other lengths) too."""
    model = T.llama()
    for lens, seed in (([7, 12], 1), ([5], 2)):
        inputs = T.text_inputs(lens, seed=seed)
        ref = hf_greedy(model, inputs, 24)
        drafter, tree = oracle_for(model, inputs, ref, acceptance=0.7)
        out = vispec.generate(model, drafter, **inputs, max_new_tokens=24, tree=tree, compile=True)
        assert torch.equal(out.sequences, ref)


def row_inputs(inputs, r):
    """Row r alone, without padding (per-image tensors of that row only)."""
    mask = inputs["attention_mask"][r].bool()
    out = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):  # per-token inputs
            out[k] = v[r : r + 1][:, mask]
        elif k == "pixel_values" and "image_grid_thw" in inputs:  # Qwen: flat patches of all images
            per = int(inputs["image_grid_thw"][r].prod())
            out[k] = v[r * per : (r + 1) * per]
        else:
            out[k] = v[r : r + 1]
    return out


def test_right_padding_equals_per_row_generation(target):
    name, model, make_inputs = target
    inputs = make_inputs([4, 9], seed=5, padding="right")
    drafter = vispec.EagleDrafter.from_target(model, seed=1)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=12)
    for r in range(2):
        mask = inputs["attention_mask"][r].bool()
        single = row_inputs(inputs, r)
        want = hf_greedy(model, single, 12)[0, mask.sum():]
        assert torch.equal(out.sequences[r, inputs["input_ids"].shape[1]:], want)


def test_eos_inside_accepted_draft(target):
    name, model, make_inputs = target
    inputs = make_inputs([8], seed=7)
    p = inputs["input_ids"].shape[1]
    free = hf_greedy(model, inputs, 30)
    eos = int(free[0, p + 9])  # a token the target emits 10th: inside some accepted chain
    ref = hf_greedy(model, inputs, 30, eos_token_id=eos, pad_token_id=T.PAD)
    assert ref.shape[1] < free.shape[1] or (ref[0, p:] == eos).any()
    drafter, tree = oracle_for(model, inputs, free, acceptance=1.0, depth=4, width=2)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=30, tree=tree, eos_token_id=eos, pad_token_id=T.PAD)
    assert torch.equal(out.sequences, ref)


def test_eos_batch_rows_finish_independently(target):
    name, model, make_inputs = target
    inputs = make_inputs([8, 5, 11], seed=8)
    p = inputs["input_ids"].shape[1]
    free = hf_greedy(model, inputs, 25)
    eos = int(free[1, p + 4])
    ref = hf_greedy(model, inputs, 25, eos_token_id=eos, pad_token_id=T.PAD)
    drafter, tree = oracle_for(model, inputs, free, acceptance=0.8, depth=3, width=3)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=25, tree=tree, eos_token_id=eos, pad_token_id=T.PAD)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_mid_draft(target, max_new):
    name, model, make_inputs = target
    inputs = make_inputs([6, 9], seed=9)
    ref = hf_greedy(model, inputs, max_new)
    drafter, tree = oracle_for(model, inputs, hf_greedy(model, inputs, max_new + 8), acceptance=1.0, depth=5, width=2)
    out = vispec.generate(model, drafter, **inputs, max_new_tokens=max_new, tree=tree)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + max_new  # never more than asked
    assert torch.equal(out.sequences, ref)


def test_streamer_receives_the_same_text(target):
    name, model, make_inputs = target
    inputs = make_inputs([5], seed=10)

    class Collect:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = vispec.generate(model, vispec.EagleDrafter.from_target(model), **inputs, max_new_tokens=10, streamer=s)
    assert s.ended and s.chunks[0] == inputs["input_ids"][0].tolist()
    assert sum(s.chunks[1:], []) == out.sequences[0, inputs["input_ids"].shape[1]:].tolist()


# ---------------------------------------------------------------------------
# Sampling: vispec's samples follow the target's distribution
# ---------------------------------------------------------------------------
SAMPLES = 6000
# Exact joint law of the first two tokens over 8 x 8 = 64 cells: an exact sampler's TV
# distance from 6000 draws averages about 0.04; 0.08 is about 5 standard deviations above.
TV_BOUND_2TOK = 0.08


def exact_two_token_law(model, prompt, temperature, top_k, top_p):
    from vispec.reference import processed_probs_ref

    with torch.no_grad():
        p1 = processed_probs_ref(model(prompt).logits[0, -1], temperature, top_k, top_p)
        v = p1.numel()
        joint = torch.zeros(v, v, dtype=torch.float64)
        for x in range(v):
            if p1[x] > 0:
                ext = torch.cat([prompt, torch.tensor([[x]])], 1)
                joint[x] = p1[x] * processed_probs_ref(model(ext).logits[0, -1], temperature, top_k, top_p)
    return joint


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8)], ids=["T1", "T0.7-k3", "T1.3-p0.8"]
)
@pytest.mark.parametrize("drafter_kind", ["eagle", "oracle"])
def test_sampling_follows_target_distribution(temperature, top_k, top_p, drafter_kind):
    model = T.llama(seed=4, vocab_size=8)
    # Peaked enough that drafts get accepted and rejected: scale the head.
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    prompt = torch.tensor([[1, 5, 2, 7, 3]])
    joint = exact_two_token_law(model, prompt, temperature, top_k, top_p)
    ids = prompt.expand(SAMPLES, -1).contiguous()
    if drafter_kind == "eagle":
        drafter, tree = vispec.EagleDrafter.from_target(model, seed=0), TreeConfig(6, 3, 2)
    else:  # proposes the greedy continuation: drafts a sampler often accepts, sometimes rejects
        greedy = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)[:, 5:].expand(SAMPLES, -1)
        drafter = OracleDrafter(greedy, 8, acceptance=1.0, width=2, seed=1)
        tree = TreeConfig(6, 3, 2)
    out = vispec.generate(
        model, drafter, input_ids=ids, max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p, tree=tree, seed=11
    )
    x1, x2 = out.sequences[:, 5], out.sequences[:, 6]
    counts = torch.bincount(x1 * 8 + x2, minlength=64).double().view(8, 8)
    assert (joint[counts > 0] > 0).all(), "a sequence of probability 0 was generated"
    tv = 0.5 * float((counts / SAMPLES - joint).abs().sum())
    assert tv < TV_BOUND_2TOK, tv
    assert out.stats.accepted_draft_tokens > 0  # drafts were really tested


# ---------------------------------------------------------------------------
# Drop-in: model.generate made speculative with one line
# ---------------------------------------------------------------------------
def test_drop_in_matches_direct_api_and_undo(target):
    name, model, make_inputs = target
    inputs = make_inputs([6, 3], seed=12)
    ref = model.generate(**inputs, max_new_tokens=15, do_sample=False)
    drafter = vispec.EagleDrafter.from_target(model, seed=2)
    direct = vispec.generate(model, drafter, **inputs, max_new_tokens=15)
    handle = vispec.accelerate(model, drafter)
    try:
        got = model.generate(**inputs, max_new_tokens=15, do_sample=False)
        assert handle.last_stats is not None and handle.last_stats.target_forwards > 0  # really ran vispec
        assert torch.equal(got, direct.sequences) and torch.equal(got, ref)
        as_dict = model.generate(**inputs, max_new_tokens=15, return_dict_in_generate=True)
        assert torch.equal(as_dict.sequences, ref)
    finally:
        handle.undo()
    assert "generate" not in model.__dict__
    assert torch.equal(model.generate(**inputs, max_new_tokens=15, do_sample=False), ref)


def test_drop_in_sampling_uses_generation_config():
    model = T.llama(seed=5)
    inputs = T.text_inputs([5, 8], seed=13)
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model))
    try:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 10)
        assert handle.fallbacks == 0 and handle.last_stats.target_forwards > 0
    finally:
        handle.undo()


@pytest.mark.parametrize(
    "kwargs,what",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(repetition_penalty=1.3), "repetition_penalty"),
        (dict(min_new_tokens=4), "min_new_tokens"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
    ],
)
def test_drop_in_falls_back_with_a_warning(kwargs, what):
    model = T.llama(seed=6)
    inputs = T.text_inputs([6], seed=14)
    want = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model))
    try:
        with pytest.warns(UserWarning, match=what):
            got = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    finally:
        handle.undo()
    want_seq = want.sequences if hasattr(want, "sequences") else want
    got_seq = got.sequences if hasattr(got, "sequences") else got
    assert torch.equal(got_seq, want_seq) and handle.fallbacks == 1


from vispec.testing import tiny_tokenizer  # noqa: E402


def test_hf_text_streamer(capsys):
    from transformers import TextStreamer

    model = T.llama(seed=8)
    tokenizer = tiny_tokenizer()
    inputs = tokenizer(["t5 t17 t99 t3"], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = vispec.generate(model, vispec.EagleDrafter.from_target(model), **inputs, max_new_tokens=12,
                          streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert torch.equal(out.sequences, ref)
    assert printed.strip() == tokenizer.decode(ref[0, 4:]).strip() != ""


# ---------------------------------------------------------------------------
# Drop-in follows model.generate's own rules
# ---------------------------------------------------------------------------
def test_drop_in_defaults_match_transformers():
    """vispec's table of generate-time defaults is transformers' own."""
    from transformers import GenerationConfig
    from vispec.accelerate import GENERATE_DEFAULTS

    theirs = getattr(GenerationConfig, "_get_default_generation_params", None)
    if theirs is None:
        pytest.skip("this transformers has no generate-time defaults table")
    theirs = theirs()
    assert {k: theirs[k] for k in GENERATE_DEFAULTS} == GENERATE_DEFAULTS


def test_drop_in_length_rules_and_config_without_max_new_tokens():
    from transformers import GenerationConfig

    model = T.llama(seed=5)
    inputs = T.text_inputs([5, 8], seed=21)
    cases = [dict(generation_config=GenerationConfig(do_sample=False)),  # HF default: 20 new tokens
             dict(max_length=17), dict(max_length=40, max_new_tokens=6), dict()]
    refs = [model.generate(**inputs, **kw) for kw in cases]
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model, seed=1))
    try:
        for kw, ref in zip(cases, refs):
            got = model.generate(**inputs, **kw)
            assert handle.fallbacks == 0 and torch.equal(got, ref), kw
    finally:
        handle.undo()


def test_drop_in_sampling_resolves_options_as_generate_does():
    """do_sample is honoured, and unset fields take transformers' defaults (top_k 50, temperature 1)."""
    from transformers import GenerationConfig

    model = T.llama(seed=5)
    inputs = T.text_inputs([6], seed=22)
    greedy = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model, seed=1))
    try:
        outs = [model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.5) for _ in range(4)]
        assert handle.last_options == dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=None,
                                           eos_token_id=None, pad_token_id=T.PAD)
        assert any(not torch.equal(o, greedy) for o in outs)  # really sampled
        model.generate(**inputs, generation_config=GenerationConfig(do_sample=True, top_k=0, top_p=0.8), max_new_tokens=3)
        assert handle.last_options["top_k"] is None and handle.last_options["top_p"] == 0.8
        assert handle.last_options["temperature"] == 1.0
        model.generate(**inputs, max_new_tokens=3)
        assert handle.last_options["temperature"] == 0.0
    finally:
        handle.undo()


def test_undo_restores_a_users_own_generate():
    model = T.llama(seed=5)
    inputs = T.text_inputs([4], seed=23)
    calls = []

    def mine(*args, **kwargs):
        calls.append(kwargs)
        return type(model).generate(model, *args, **kwargs)

    model.generate = mine
    handle = vispec.accelerate(model, vispec.EagleDrafter.from_target(model, seed=1))
    with pytest.warns(UserWarning, match="num_beams"):
        model.generate(**inputs, max_new_tokens=3, num_beams=2)  # a fallback goes to the user's generate
    assert len(calls) == 1
    handle.undo()
    assert model.__dict__["generate"] is mine
    handle.undo()  # twice is harmless
    assert model.__dict__["generate"] is mine


def test_no_warning_from_vispec_on_this_transformers(target):
    """One generation per family with warnings as errors (a deprecated argument name would raise)."""
    import warnings

    name, model, make_inputs = target
    inputs = make_inputs([5], seed=30)
    drafter = vispec.EagleDrafter.from_target(model, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vispec.generate(model, drafter, **inputs, max_new_tokens=6, tree=TreeConfig(6, 2, 3))


def test_adapter_logits_are_the_models_own_with_softcap():
    """Verification scores what the model's forward scores: Gemma-style final logit softcapping included."""
    from vispec.models import adapter_for

    for model in (T.gemma3_text(seed=2, final_logit_softcapping=5.0), T.llama(seed=2)):
        inputs = T.text_inputs([6], seed=31)
        with torch.no_grad():
            want = model(**inputs).logits[:, -1]
            adapter = adapter_for(model)
            got = adapter.logits(adapter.base(**inputs).last_hidden_state[:, -1])
        torch.testing.assert_close(got, want)
