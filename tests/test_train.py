"""vispec train: training raises tau, keeps losslessness, resumes exactly."""
import pytest
import torch

import vispec
from vispec.testing import tiny_llava_and_processor
from vispec.data import ShardDataset, build_prompt, generate_shards, load_samples
from vispec.drafters import TreeConfig
from vispec.train import TrainConfig, evaluate_tau, train

TREE = TreeConfig(6, 3, 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny LLaVA, its greedy long answers to 14 image prompts (shards), and 3 held-out prompts."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    (root / "img").mkdir()
    recs = []
    for i in range(17):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": f"t{30 + i} t{60 + i}"}]})
    (root / "data.json").write_text(json.dumps(recs))
    model, proc = tiny_llava_and_processor()
    samples = load_samples(root / "data.json")
    generate_shards(model, proc, samples[:14], root / "shards", root / "img", suffix="t2", max_new_tokens=40,
                    batch_size=7, progress=False)
    # The same answers with the states entering layers 0 and 1 (what EAGLE-3 heads read) stored too.
    generate_shards(model, proc, samples[:14], root / "shards3", root / "img", suffix="t2", max_new_tokens=40,
                    batch_size=7, progress=False, feature_layers=[0, 1])
    held = []
    for s in samples[14:]:
        img = Image.open(root / "img" / s.image).convert("RGB")
        inp = proc(text=[build_prompt(proc, s, "t2", True)], images=[img], return_tensors="pt")
        inp.pop("token_type_ids", None)
        held.append(dict(inp))
    return model, ShardDataset(root / "shards"), held


@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
def test_training_raises_tau_and_stays_lossless(tmp_path, corpus, kind):
    model, data, held = corpus
    cls = vispec.drafters.DRAFTERS[kind]
    drafter = cls.from_target(model, seed=0)
    before = evaluate_tau(model, drafter, held, 40, TREE)
    cfg = TrainConfig(stage=1, epochs=16, lr=3e-3, warmup_steps=10, passes=2, log_every=1000)
    res = train(model, drafter, data, cfg, tmp_path / kind, eval_inputs=held[:1], eval_tokens=20, tree=TREE, progress=False)
    after = evaluate_tau(model, drafter, held, 40, TREE)
    assert res["steps"] == 16 * 14 and len(res["tau_history"]) == 16
    assert after > before + 0.5, (kind, before, after)
    for inp in held:  # a trained drafter changes speed, never the output
        ref = model.generate(**inp, max_new_tokens=30, do_sample=False)
        assert torch.equal(vispec.generate(model, drafter, **inp, max_new_tokens=30, tree=TREE).sequences, ref)
    back = vispec.load_drafter(tmp_path / kind / "final", model)
    assert all(torch.equal(a, b) for a, b in zip(drafter.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
def test_eagle3_training_raises_tau_and_stays_lossless(tmp_path, corpus, kind):
    """EAGLE-3 heads (three... here two target layers, training-time test over 4 steps) learn from the shards'
    aux_hidden; same budget as the EAGLE-2 test above."""
    model, data, held = corpus
    data3 = ShardDataset(data.index[0][0].parent.parent / "shards3")
    assert data3.feature_layers == [0, 1] and data.feature_layers is None
    r0 = data3[0]
    assert r0["aux_hidden"].shape == (r0["input_ids"].shape[0], 2 * model.config.text_config.hidden_size)
    drafter = vispec.drafters.DRAFTERS[kind].from_target(model, seed=0, generation=3, feature_layers=[0, 1])
    before = evaluate_tau(model, drafter, held, 40, TREE)
    cfg = TrainConfig(stage=1, epochs=16, lr=3e-3, warmup_steps=10, ttt_steps=4, log_every=1000)
    train(model, drafter, data3, cfg, tmp_path / kind, progress=False)
    after = evaluate_tau(model, drafter, held, 40, TREE)
    assert after > before + 0.5, (kind, before, after)
    for inp in held:
        ref = model.generate(**inp, max_new_tokens=30, do_sample=False)
        assert torch.equal(vispec.generate(model, drafter, **inp, max_new_tokens=30, tree=TREE).sequences, ref)
    with pytest.raises(ValueError, match="holds no aux_hidden"):  # shards without the layers: refused up front
        train(model, vispec.EagleDrafter.from_target(model, generation=3, feature_layers=[0, 1]), data, cfg,
              tmp_path / "no-aux", progress=False)


def test_online_records_equal_the_stored_ones_and_ranks_split_the_answers(tmp_path, corpus):
    """--online: the target computes in the loop what the shards store (same answers, same hidden and
    layer states up to bf16); with two ranks each answers half the samples, and both see all of them."""
    import threading

    from vispec.data import OnlineDataset

    model, data, _ = corpus
    from vispec.testing import tiny_llava_and_processor

    _, proc = tiny_llava_and_processor()
    root = data.index[0][0].parent.parent
    samples = load_samples(root / "data.json")[:14]
    stored = ShardDataset(root / "shards3")
    by_id = {stored[i]["id"]: stored[i] for i in range(len(stored))}
    online = {}

    def build(rank):
        online[rank] = OnlineDataset(model, proc, samples, tmp_path / "work", images_root=root / "img", suffix="t2",
                                     max_new_tokens=40, batch_size=7, feature_layers=[0, 1], rank=rank, world=2,
                                     progress=False, wait_s=0.05)

    threads = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    lines = [len((tmp_path / "work" / f"answers-{r}-of-2.jsonl").read_text().splitlines()) for r in range(2)]
    assert lines == [8, 8] and len(online[0]) == len(online[1]) == 14  # a settings line + 7 answers each
    for i in range(len(online[0])):
        rec = online[0][i]
        want = by_id[rec["id"]]
        for k in ("input_ids", "loss_mask", "image_mask"):
            assert torch.equal(rec[k], want[k]), (rec["id"], k)
        for k in ("hidden", "aux_hidden", "image_embeds"):
            torch.testing.assert_close(rec[k].float(), want[k].float(), atol=3e-2, rtol=3e-2)
    again = OnlineDataset(model, proc, samples, tmp_path / "work", images_root=root / "img", suffix="t2",
                          max_new_tokens=40, feature_layers=[0, 1], rank=0, world=2, progress=False)
    assert len(again) == 14 and lines[0] == len((tmp_path / "work" / "answers-0-of-2.jsonl").read_text().splitlines())


def test_resume_gives_the_uninterrupted_state(tmp_path, corpus):
    model, data, _ = corpus
    cfg = TrainConfig(stage=2, epochs=3, lr=1e-3, warmup_steps=5, passes=2, log_every=1000)
    a = vispec.ViSpecDrafter.from_target(model, seed=4)
    train(model, a, data, cfg, tmp_path / "a", progress=False)
    b = vispec.ViSpecDrafter.from_target(model, seed=4)
    r1 = train(model, b, data, cfg, tmp_path / "b", max_steps=17, progress=False)  # interrupted mid-epoch 2
    assert r1["steps"] == 17
    c = vispec.ViSpecDrafter.from_target(model, seed=99)  # a fresh process: weights come from the checkpoint
    r2 = train(model, c, data, cfg, tmp_path / "b", progress=False)
    assert r2["steps"] == 3 * 14
    for (k, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), k


def test_cli_train_stage1_then_stage2(tmp_path, corpus):
    import json

    from vispec.cli import main

    model, data, _ = corpus
    from vispec.testing import tiny_llava_and_processor

    _, proc = tiny_llava_and_processor()
    model.save_pretrained(tmp_path / "target")
    proc.save_pretrained(tmp_path / "target")
    shard_dir = str(data.index[0][0].parent)
    held = tmp_path / "held.json"
    img_dir = data.index[0][0].parent.parent / "img"
    held.write_text(json.dumps([{"id": "h", "image": "15.png", "conversations": [{"from": "human", "value": "t45"}]}]))
    common = ["--model", str(tmp_path / "target"), "--data", shard_dir, "--epochs", "2", "--lr", "1e-3",
              "--tree", "6", "3", "2"]
    assert main(["train", *common, "--drafter", "eagle", "--out", str(tmp_path / "s1")]) == 0
    assert (tmp_path / "s1" / "final" / "config.json").is_file()
    assert main(["train", *common, "--drafter", "vispec", "--stage", "2", "--init", str(tmp_path / "s1" / "final"),
                 "--out", str(tmp_path / "s2"), "--eval-data", str(held), "--images-root", str(img_dir),
                 "--suffix", "t2", "--eval-tokens", "8"]) == 0
    d = vispec.load_drafter(tmp_path / "s2" / "final", model)
    s1 = vispec.load_drafter(tmp_path / "s1" / "final", model)
    assert type(d) is vispec.ViSpecDrafter and not torch.equal(d.fc.weight, s1.fc.weight)  # stage 2 trained on
    # EAGLE-3 heads: the layers come from the shards; shards without them are refused before the model loads.
    shards3 = str(data.index[0][0].parent.parent / "shards3")
    common3 = [a if a != shard_dir else shards3 for a in common]
    assert main(["train", *common3, "--drafter", "eagle", "--generation", "3", "--ttt-steps", "3",
                 "--out", str(tmp_path / "e3")]) == 0
    e3 = vispec.load_drafter(tmp_path / "e3" / "final", model)
    assert e3.config.generation == 3 and e3.feature_layers == [0, 1]
    assert main(["train", *common, "--drafter", "eagle", "--generation", "3", "--out", str(tmp_path / "x")]) == 2
    # --online: the samples file instead of shards; the target runs in the loop.
    online = [a if a != shard_dir else str(data.index[0][0].parent.parent / "data.json") for a in common]
    assert main(["train", *online, "--online", "--images-root", str(img_dir), "--suffix", "t2", "--max-new-tokens", "20",
                 "--drafter", "hivis", "--generation", "3", "--ttt-steps", "2", "--draft-vocab", "60",
                 "--out", str(tmp_path / "on")]) == 0
    on = vispec.load_drafter(tmp_path / "on" / "final", model)
    assert on.feature_layers == [1, 1, 0] and 0 < on.config.draft_vocab_size <= 60  # the answers use fewer tokens
    assert main(["train", *common3, "--drafter", "eagle", "--generation", "3", "--feature-layers", "1,0",
                 "--out", str(tmp_path / "x")]) == 2


def test_ddp_two_processes_on_cpu(tmp_path, corpus):
    """Several devices through torchrun + accelerate (DDP over gloo here): ranks split the data, stay in sync."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _, data, _ = corpus
    torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    worker = Path(__file__).parent / "ddp_worker.py"
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", str(worker), str(data.index[0][0].parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(r["steps"] == 2 * 7 for r in ranks)  # 14 samples, 2 epochs, each rank half of every epoch
    assert ranks[0]["fc_sum"] == ranks[1]["fc_sum"]  # gradients were all-reduced: identical weights
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_listmle_is_the_plackett_luce_likelihood_of_the_targets_order():
    """By hand on 3 tokens: the target ranks b > c > a; the loss is -log P(b, c, a) under softmax scores."""
    import math

    from vispec.train import listmle

    draft = torch.log_softmax(torch.tensor([[0.5, 2.0, -1.0, -3.0]]), -1)
    target = torch.log_softmax(torch.tensor([[0.1, 3.0, 1.0, -9.0]]), -1)
    s = draft[0].tolist()
    b, c, a = s[1], s[2], s[0]
    want = -(b - math.log(math.exp(b) + math.exp(c) + math.exp(a)) + c - math.log(math.exp(c) + math.exp(a)))
    assert abs(float(listmle(draft, target, k=3)) - want) < 1e-5
    # the loss falls when the draft agrees with the target's order, and is 0 only in the limit
    agree = torch.log_softmax(torch.tensor([[1.0, 9.0, 5.0, -9.0]]), -1)
    assert float(listmle(agree, target, k=3)) < float(listmle(draft, target, k=3))


def test_stage2_is_vispecs_objective():
    from vispec.train import STAGES, TrainConfig

    assert STAGES[2] == dict(w_feature=0.0, w_ce=0.0, w_l1=10.0, w_rank=0.1, w_topk=0.0)
    assert TrainConfig(stage=2, w_rank=0.5).weights()["w_rank"] == 0.5
