"""vispec data generate: shards, resume without loss or duplicates, skipped samples."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vispec.testing import IMAGE_ID, tiny_llava_and_processor
from vispec.data import LONG_ANSWER_SUFFIX, AnswerLog, ShardDataset, done_ids, generate_shards, load_samples



@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    records = []
    for i in range(7):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(tmp_path / "img" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\nt{10 + i} t{20 + i}"}, {"from": "gpt", "value": "x"}]})
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    records.append({"id": "bad", "image": "bad.png", "conversations": [{"from": "human", "value": "t5"}]})
    records.append({"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "t6"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "t7 t8 t9"}]})  # ShareGPT-style
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path, tmp_path / "img"


def test_generate_resume_skip(tmp_path, dataset):
    path, images = dataset
    model, proc = tiny_llava_and_processor()
    samples = load_samples(path)
    assert [s.image for s in samples][-3:] == ["bad.png", "nope.png", None]
    out = tmp_path / "shards"
    # An interrupted run: only the first 4 samples get through.
    c1 = generate_shards(model, proc, samples[:4], out, images, suffix="t2 t3", max_new_tokens=6, batch_size=3, shard_size=2, progress=False)
    assert c1 == {"written": 4, "skipped": 0, "already_done": 0, "replayed": 0}
    (out / "shard-99999.tmp").write_bytes(b"half-written")  # a crash mid-write leaves a temp file
    c2 = generate_shards(model, proc, samples, out, images, suffix="t2 t3", max_new_tokens=6, batch_size=3, shard_size=2, progress=False)
    assert c2 == {"written": 4, "skipped": 2, "already_done": 4, "replayed": 0}
    assert not list(out.glob("*.tmp"))
    ids = [ShardDataset(out)[i]["id"] for i in range(len(ShardDataset(out)))]
    assert sorted(ids) == sorted(["s0", "s1", "s2", "s3", "s4", "s5", "s6", "text"])  # none lost, none twice
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == {"bad", "missing"} and all("image" in s["reason"] for s in skipped)
    # A third run has nothing left to do.
    c3 = generate_shards(model, proc, samples, out, images, max_new_tokens=6, progress=False)
    assert c3["written"] == 0 and c3["already_done"] == 10
    assert done_ids(out) == set(ids)


def _records(out):
    ds = ShardDataset(out)
    return {ds[i]["id"]: ds[i] for i in range(len(ds))}


def test_answers_file_rebuilds_the_shards_without_generating(tmp_path, dataset, monkeypatch):
    """Shards are rebuilt from a logged answers file by one forward per sample (sampled answers included: no
    generation, so the same answers); samples written before the log was kept are logged from the shards;
    other generation settings, or a line cut by an interruption, are handled, not silently mixed."""
    path, images = dataset
    model, proc = tiny_llava_and_processor()
    samples = load_samples(path)
    kw = dict(suffix="t2", max_new_tokens=6, batch_size=3, shard_size=2, temperature=1.0, progress=False)
    torch.manual_seed(0)
    generate_shards(model, proc, samples[:3], tmp_path / "a", images, **kw)  # before the log was kept
    log = tmp_path / "answers.jsonl"
    c = generate_shards(model, proc, samples, tmp_path / "a", images, answers_file=log, **kw)
    assert c["written"] == 5 and c["replayed"] == 0 and c["already_done"] == 3
    first = _records(tmp_path / "a")
    entries = AnswerLog(log, {"suffix": "t2", "max_new_tokens": 6, "temperature": 1.0}).entries
    assert set(entries) == set(first)  # the 3 older samples logged from the shards, the 5 new ones as answered

    def no_generation(*a, **k):
        raise AssertionError("a logged answer was generated again")

    monkeypatch.setattr(model, "generate", no_generation)
    with open(log, "a") as f:
        f.write('{"id": "s9", "ans')  # an interrupted append: dropped, not an error
    c = generate_shards(model, proc, samples, tmp_path / "b", images, answers_file=log, **kw)
    assert c["replayed"] == 8 and c["written"] == 8 and c["skipped"] == 2
    again = _records(tmp_path / "b")
    assert set(again) == set(first)
    for sid, rec in first.items():
        for k in ("input_ids", "loss_mask", "image_mask"):
            assert torch.equal(again[sid][k], rec[k]), (sid, k)
        for k in ("hidden", "image_embeds"):
            torch.testing.assert_close(again[sid][k].float(), rec[k].float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="other settings.*temperature"):
        generate_shards(model, proc, samples, tmp_path / "c", images, answers_file=log, **{**kw, "temperature": 0.0})


def test_stored_sample_contents(tmp_path, dataset):
    path, images = dataset
    model, proc = tiny_llava_and_processor()
    samples = load_samples(path)[:2]
    out = tmp_path / "shards"
    generate_shards(model, proc, samples, out, images, suffix="t2 t3", max_new_tokens=5, batch_size=2, progress=False)
    ds = ShardDataset(out)
    for i, s in enumerate(samples):
        rec = ds[i]
        ids = rec["input_ids"]
        assert (rec["image_mask"].bool() == (ids == IMAGE_ID)).all() and int(rec["image_mask"].sum()) == 16
        assert int(rec["loss_mask"].sum()) == 5 and rec["loss_mask"][-5:].all()  # the generated answer
        assert rec["hidden"].dtype == torch.bfloat16 and rec["hidden"].shape == (len(ids), 64)
        assert rec["image_embeds"].shape == (16, 64)
        # The answer is the target's greedy answer to that prompt, and the hidden states its own.
        img = Image.open(images / s.image).convert("RGB")
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{s.instruction} t2 t3"}]}], add_generation_prompt=True, tokenize=False)
        inp = proc(text=[prompt], images=[img], return_tensors="pt")
        inp.pop("token_type_ids", None)
        ref = model.generate(**inp, max_new_tokens=5, do_sample=False)[0]
        assert torch.equal(ids, ref)
        with torch.no_grad():
            h = model.model(input_ids=ref[None], pixel_values=inp["pixel_values"]).last_hidden_state[0]
        torch.testing.assert_close(rec["hidden"].float(), h, atol=2e-2, rtol=2e-2)


def test_load_samples_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"id": 1, "conversations": [{"from": "human", "value": "a"}]}, {"id": 1, "conversations": [{"from": "human", "value": "b"}]}]))
    with pytest.raises(ValueError, match="sample id '1' appears twice"):
        load_samples(p)
    p.write_text(json.dumps([{"id": 1, "conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match="has no human turn"):
        load_samples(p)
    assert "1000 words" in LONG_ANSWER_SUFFIX


def test_cli_data_generate(tmp_path, dataset, capsys):
    from vispec.cli import main

    path, images = dataset
    model, proc = tiny_llava_and_processor()
    model.save_pretrained(tmp_path / "target")
    proc.save_pretrained(tmp_path / "target")
    args = ["data", "generate", "--model", str(tmp_path / "target"), "--data", str(path), "--images-root", str(images),
            "--out", str(tmp_path / "shards"), "--max-new-tokens", "4", "--batch-size", "4", "--shard-size", "3", "--limit", "5"]
    assert main(args) == 0
    assert len(ShardDataset(tmp_path / "shards")) == 5
    assert main(args[:-1] + ["9"]) == 0  # resume with more samples: only the new ones are generated
    ds = ShardDataset(tmp_path / "shards")
    assert len(ds) == 7 and len({ds[i]["id"] for i in range(len(ds))}) == 7
    assert main(args[:-2] + ["--batch-size", "0"]) == 2
    # With an answers log, a fresh output folder is rebuilt from it: every sample replayed, none generated.
    log = tmp_path / "answers.jsonl"
    assert main(args[:-2] + ["--limit", "3", "--answers", str(log)]) == 0  # logs the 7 stored samples' answers
    assert len(log.read_text().splitlines()) == 1 + 7
    again = [("--out" if a == "--out" else a) for a in args]
    again[again.index("--out") + 1] = str(tmp_path / "rebuilt")
    assert main(again[:-2] + ["--limit", "7", "--answers", str(log)]) == 0
    assert "7 samples written (7 from logged answers)" in capsys.readouterr().out


class QwenShimProcessor:
    """Stands in for Qwen2VLProcessor (whose video processor needs torchvision): one 16 x 24 image per
    prompt becomes <vision_start> + 6 image tokens, with mm_token_type_ids, as the real processor does."""

    image_token = "<image>"
    chat_template = None

    def __init__(self):
        from vispec.testing import tiny_tokenizer

        self.tokenizer = tiny_tokenizer()

    type_key = "mm_token_type_ids"

    def image_tokens(self):
        import tiny_models as T

        return torch.cat([torch.tensor([T.VISION_START]), torch.full((T.QWEN_IMAGE_TOKENS,), T.IMAGE_TOKEN)])

    def pixels(self, generators):
        import tiny_models as T

        return {"pixel_values": torch.cat([torch.randn(24, 3 * 2 * 4 * 4, generator=g) for g in generators]),
                "image_grid_thw": torch.tensor([T.QWEN_GRID] * len(generators))}

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        import tiny_models as T

        rows = []
        for t in text:
            ids = torch.tensor(self.tokenizer(t.replace(self.image_token, "").split(), is_split_into_words=True)["input_ids"])
            rows.append(torch.cat([self.image_tokens(), ids]) if images else ids)
        out = T.pad_rows(rows, "left")
        out[self.type_key] = (out["input_ids"] == T.IMAGE_TOKEN).long()
        if images:  # pixels derived from each image's content, so one image always gives the same patches
            out.update(self.pixels([torch.Generator().manual_seed(int(np.asarray(im).astype(np.int64).sum()) % 2**31)
                                    for im in images]))
        return BatchFeature(out)


def test_generate_qwen_vl_shards(tmp_path, dataset):
    import tiny_models as T

    path, images = dataset
    model, proc = T.qwen2_vl(), QwenShimProcessor()
    samples = load_samples(path)[:3]
    out = tmp_path / "shards"
    generate_shards(model, proc, samples, out, images, suffix="t2", max_new_tokens=6, batch_size=3, progress=False)
    ds = ShardDataset(out)
    assert len(ds) == 3
    # Stored hidden states = the model's own forward over prompt + answer with M-RoPE positions.
    img = Image.open(images / samples[0].image).convert("RGB")
    inp = proc(text=[f"{proc.image_token}\n{samples[0].instruction} t2"], images=[img])
    ref = model.generate(**inp, max_new_tokens=6, do_sample=False)[0]
    rec = next(ds[i] for i in range(3) if ds[i]["id"] == samples[0].id)
    assert torch.equal(rec["input_ids"], ref)
    assert int(rec["image_mask"].sum()) == T.QWEN_IMAGE_TOKENS and rec["image_embeds"].shape[0] == T.QWEN_IMAGE_TOKENS
    mm = (ref[None] == T.IMAGE_TOKEN).long()
    with torch.no_grad():
        h = model.model(input_ids=ref[None], pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                        mm_token_type_ids=mm, attention_mask=torch.ones_like(ref[None])).last_hidden_state[0]
    torch.testing.assert_close(rec["hidden"].float(), h, atol=2e-2, rtol=2e-2)


class Gemma3ShimProcessor(QwenShimProcessor):
    """Stands in for Gemma3Processor: <boi> + 4 image tokens + <eoi>, token_type_ids 1 on image tokens."""

    type_key = "token_type_ids"

    def image_tokens(self):
        import tiny_models as T

        return torch.cat([torch.tensor([T.BOI]), torch.full((4,), T.IMAGE_TOKEN), torch.tensor([T.EOI])])

    def pixels(self, generators):
        return {"pixel_values": torch.stack([torch.randn(3, 32, 32, generator=g) for g in generators])}


def test_generate_gemma3_shards_keep_the_bidirectional_image_mask(tmp_path, dataset):
    """Gemma-3's image tokens attend to each other both ways (token_type_ids): the stored forward must too."""
    import tiny_models as T

    path, images = dataset
    model, proc = T.gemma3(), Gemma3ShimProcessor()
    samples = load_samples(path)[:2]
    out = tmp_path / "shards"
    generate_shards(model, proc, samples, out, images, suffix="t2", max_new_tokens=6, batch_size=2, progress=False)
    ds = ShardDataset(out)
    img = Image.open(images / samples[0].image).convert("RGB")
    inp = proc(text=[f"{proc.image_token}\n{samples[0].instruction} t2"], images=[img])
    ref = model.generate(**inp, max_new_tokens=6, do_sample=False)[0]
    rec = next(ds[i] for i in range(2) if ds[i]["id"] == samples[0].id)
    assert torch.equal(rec["input_ids"], ref)
    with torch.no_grad():
        h = model.model(input_ids=ref[None], pixel_values=inp["pixel_values"],
                        token_type_ids=(ref[None] == T.IMAGE_TOKEN).long(),
                        attention_mask=torch.ones_like(ref[None])).last_hidden_state[0]
    torch.testing.assert_close(rec["hidden"].float(), h, atol=2e-2, rtol=2e-2)
