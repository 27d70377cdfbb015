"""Drafter training data: the target answers (long) prompts, and what the drafter learns from is stored.

``vispec data generate`` runs the target over image + instruction samples (LLaVA-style
JSON / JSONL with image paths) or text conversations (ShareGPT-style, for stage 1),
appends a long-answer suffix ("Please answer with at least 1000 words." as ViSpec),
generates (greedy by default), then runs one forward over prompt + answer and writes
shards (safetensors) holding, per sample:

    input_ids    (L,)      int64   prompt + answer
    loss_mask    (L,)      uint8   1 on generated tokens
    image_mask   (L,)      uint8   1 at image / video positions
    hidden       (L, H)    bf16    the target's last hidden states (after the final norm)
    aux_hidden   (L, n*H)  bf16    with ``feature_layers``: the hidden states entering those n
                                   decoder layers, concatenated (what EAGLE-3 drafters read;
                                   the layers are in each shard's metadata)
    image_embeds (n, H)    bf16    the input embeddings at image positions (projected vision
                                   features); text embeddings come back from input_ids

A shard is written to a temporary name and renamed when complete, and carries the
ids of its samples in its metadata, so an interrupted run resumes without losing or
duplicating samples. Unreadable or missing images skip the sample, with the reason
logged in ``skipped.jsonl``.

At scale the hidden states of three layers cost terabytes: :class:`OnlineDataset`
(``vispec train --online``) keeps only the answers' token ids on disk and lets the
frozen target compute each record when training reads it. The same answers (an
:class:`AnswerLog`, a few kB per sample) let ``generate_shards`` rebuild shards with one
forward per sample instead of a generation: what to keep where shards cannot be kept.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .journal import Journal
from .models import adapter_for

log = logging.getLogger("vispec.data")

LONG_ANSWER_SUFFIX = "Please answer with at least 1000 words."
SHARD_GLOB = "shard-*.safetensors"


@dataclass
class Sample:
    id: str
    instruction: str
    image: str | None = None  # path, relative to the images root


def load_samples(path) -> list[Sample]:
    """LLaVA-style records ({"id", "image", "conversations": [{"from": "human", "value": ...}, ...]}) or
    ShareGPT-style ones (no "image"); the first human turn is the instruction. JSON list or JSONL."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
    samples, seen = [], set()
    for i, r in enumerate(records):
        sid = str(r.get("id", i))
        if sid in seen:
            raise ValueError(f"{path}: sample id {sid!r} appears twice; ids must be unique to resume safely")
        seen.add(sid)
        turns = r.get("conversations") or r.get("messages") or []
        human = next((t for t in turns if t.get("from", t.get("role")) in ("human", "user")), None)
        if human is None:
            raise ValueError(f"{path}: sample {sid!r} has no human turn")
        instr = str(human.get("value", human.get("content", ""))).replace("<image>", "").strip()
        samples.append(Sample(sid, instr, r.get("image")))
    return samples


def done_ids(out_dir: Path) -> set[str]:
    """Ids stored in complete shards (a shard only gets its final name once fully written)."""
    from safetensors import safe_open

    ids = set()
    for shard in sorted(out_dir.glob(SHARD_GLOB)):
        with safe_open(str(shard), "pt") as f:
            ids.update(json.loads(f.metadata()["ids"]))
    return ids


def skipped_ids(out_dir: Path) -> set[str]:
    f = out_dir / "skipped.jsonl"
    if not f.exists():
        return set()
    return {json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip()}


class AnswerLog(Journal):
    """The target's answers as a :class:`~vispec.journal.Journal` of ``{"id", "answer": [token ids]}`` or
    ``{"id", "skip": reason}`` lines under the generation settings (suffix, max_new_tokens, temperature):
    reading it under other settings is refused, its answers would silently be another distribution's."""

    def __init__(self, path, config: dict):
        super().__init__(path, config, key_field="id")

    def answer(self, sid: str) -> list[int] | None:
        """The answer's token ids, or None where the sample was skipped."""
        return self.entries[sid].get("answer")


def answer_of(record: dict) -> list[int]:
    """The answer token ids of a training record (the positions its loss mask marks)."""
    return record["input_ids"][record["loss_mask"].bool()].tolist()


def build_prompt(processor, sample: Sample, suffix: str, has_image: bool) -> str:
    instruction = f"{sample.instruction} {suffix}".strip() if suffix else sample.instruction
    return chat_prompt(processor, instruction, int(has_image))


def chat_prompt(processor, text: str, n_images: int = 0) -> str:
    """One user turn (``n_images`` images, then ``text``) in the processor's chat format, ready for the answer."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    tok = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", "<image>")
    return "".join(f"{token}\n" for _ in range(n_images)) + text


def shard_layers(out_dir) -> list[list[int] | None]:
    """The distinct ``feature_layers`` the complete shards of ``out_dir`` were written with."""
    from safetensors import safe_open

    seen = []
    for shard in sorted(Path(out_dir).glob(SHARD_GLOB)):
        with safe_open(str(shard), "pt") as f:
            layers = json.loads(f.metadata().get("feature_layers", "null"))
        if layers not in seen:
            seen.append(layers)
    return seen


def check_layers(out_dir, feature_layers) -> None:
    """Resuming into a directory written with other feature layers would mix two layouts: refused."""
    for layers in shard_layers(out_dir):
        if layers != feature_layers:
            raise ValueError(f"{out_dir} holds shards written with feature_layers={layers}, not {feature_layers}: "
                             "use another --out (or the same layers) so that every sample has the same layout")


class _ShardWriter:
    def __init__(self, out_dir: Path, shard_size: int, metadata: dict | None = None):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.metadata = metadata or {}
        self.tensors, self.ids = {}, []
        existing = sorted(out_dir.glob(SHARD_GLOB))
        self.next_index = 1 + max((int(p.stem.split("-")[1]) for p in existing), default=-1)

    def add(self, sid: str, record: dict) -> None:
        k = len(self.ids)
        for name, t in record.items():
            self.tensors[f"{k}.{name}"] = t.contiguous().cpu()
        self.ids.append(sid)
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        from safetensors.torch import save_file

        final = self.out_dir / f"shard-{self.next_index:05d}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(self.tensors, str(tmp), metadata={"ids": json.dumps(self.ids), "count": str(len(self.ids)),
                                                   **self.metadata})
        os.replace(tmp, final)  # atomic: a shard is either complete or absent
        self.next_index += 1
        self.tensors, self.ids = {}, []


def _prepare_tokenizer(processor):
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _load_images(batch: list[Sample], root: Path | None, out_dir: Path):
    """(sample, RGB image or None) for the readable samples of ``batch``; the others are logged as skipped."""
    from PIL import Image

    loaded = []
    for s in batch:
        img = None
        if s.image is not None:
            p = (root / s.image) if root is not None else Path(s.image)
            try:
                with Image.open(p) as im:
                    img = im.convert("RGB")
            except Exception as e:  # missing, truncated, not an image: skip this sample, keep going
                _log_skip(out_dir, s.id, f"image {p}: {type(e).__name__}: {e}")
                continue
        loaded.append((s, img))
    return loaded


def _groups(loaded):
    """Image and text-only samples in separate groups (processors want all or none)."""
    return [g for g in ([x for x in loaded if x[1] is not None], [x for x in loaded if x[1] is None]) if g]


def _prompt_inputs(model, processor, adapter, group, suffix: str) -> dict:
    texts = [build_prompt(processor, s, suffix, im is not None) for s, im in group]
    kw = {"images": [im for _, im in group]} if group[0][1] is not None else {}
    inputs = dict(processor(text=texts, padding=True, return_tensors="pt", **kw).to(model.device))
    if "token_type_ids" not in adapter.inputs:  # tokenizers return it; only Gemma-3 takes it
        inputs.pop("token_type_ids", None)
    return inputs


def sequence_records(adapter, inputs: dict, seqs: torch.Tensor, pad_id: int | None, feature_layers=None,
                     prompt_embeds: torch.Tensor | None = None) -> list[dict]:
    """The training records of rows ``seqs`` (B, P + T) = the prompts ``inputs`` (left-padded) + answers
    (padding after EOS): ONE forward over prompt + answer (with the layer states of ``feature_layers``).

    ``prompt_embeds``: the prompts' input embeddings as the target's prefill saw them (image features
    merged); the forward then runs on embeddings (a generated image-token id stays a token). Without
    them the forward takes the ids and the images, and the model merges the features itself.
    """
    p = inputs["input_ids"].shape[1]
    full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(seqs[:, p:])], 1)
    if pad_id is not None:  # padding after EOS is not an answer: cut each row at its first pad after the prompt
        for r in range(seqs.shape[0]):
            tail = (seqs[r, p:] == pad_id).nonzero()
            if len(tail):
                full_mask[r, p + int(tail[0]) :] = 0
    model_inputs = {k: v for k, v in inputs.items() if k in adapter.inputs}
    for k in adapter.token_inputs & set(model_inputs):  # per-token inputs: answer tokens are text
        model_inputs[k] = torch.cat([model_inputs[k], torch.zeros_like(seqs[:, p:]).to(model_inputs[k].dtype)], 1)
    pos, _ = adapter.positions(seqs, full_mask, model_inputs)
    if prompt_embeds is not None:
        emb = torch.cat([prompt_embeds, adapter.embed(seqs[:, p:]).to(prompt_embeds.dtype)], 1)
        per_token = {k: model_inputs[k] for k in adapter.token_inputs if k in model_inputs}  # e.g. Gemma-3's mask
        kw = dict(inputs_embeds=emb, **per_token)
    else:
        kw = dict(input_ids=seqs, **model_inputs)
    with adapter.capture_input_embeds() as box, adapter.capture_layers(feature_layers) as cap:
        hidden = adapter.base(attention_mask=full_mask, position_ids=pos, **kw).last_hidden_state
    emb = kw.get("inputs_embeds")
    if emb is None:
        emb = box.get("inputs_embeds")
        emb = adapter.embed(seqs) if emb is None else emb
    aux = None if cap is None else cap.features()
    image_ids = adapter.image_token_ids()
    out = []
    for r in range(seqs.shape[0]):
        keep = full_mask[r].bool()
        ids = seqs[r][keep]
        n_prompt = int(inputs["attention_mask"][r].sum())
        loss = torch.zeros(len(ids), dtype=torch.uint8)
        loss[n_prompt:] = 1
        img_mask = torch.isin(ids.cpu(), torch.tensor(image_ids)) if image_ids else torch.zeros(len(ids), dtype=torch.bool)
        img_mask[n_prompt:] = False  # an image token id in the answer is just a token
        out.append({
            "input_ids": ids.cpu(),
            "loss_mask": loss,
            "image_mask": img_mask.to(torch.uint8),
            "hidden": hidden[r][keep.to(hidden.device)].to(torch.bfloat16),
            "image_embeds": emb[r][keep.to(emb.device)][img_mask.to(emb.device)].to(torch.bfloat16),
            **({} if aux is None else {"aux_hidden": aux[r][keep.to(aux.device)].to(torch.bfloat16)}),
        })
    return out


@torch.inference_mode()
def generate_shards(
    model,
    processor,
    samples: list[Sample],
    out_dir,
    images_root=None,
    suffix: str = LONG_ANSWER_SUFFIX,
    max_new_tokens: int = 1024,
    batch_size: int = 4,
    shard_size: int = 64,
    temperature: float = 0.0,
    progress: bool = True,
    feature_layers: list[int] | None = None,
    answers_file=None,
) -> dict:
    """Generates and stores the training data of ``samples`` (resumes what ``out_dir`` already holds).
    ``feature_layers`` also stores those layers' input hidden states (``aux_hidden``, EAGLE-3).

    ``answers_file``: an :class:`AnswerLog` of the answers. Samples it already answers are not generated
    again: their records come from one forward over prompt + that answer (so shards are rebuilt from it at
    the cost of a forward each, sampled answers included); the others' answers are appended to it, and so
    are those of samples the shards held before the log was kept.

    Returns counts: {"written", "skipped", "already_done", "replayed"} (replayed: written from the log).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob("*.tmp"):
        tmp.unlink()  # a shard interrupted while being written
    stored = done_ids(out_dir)
    done = stored | skipped_ids(out_dir)
    todo = [s for s in samples if s.id not in done]
    feature_layers = list(feature_layers) if feature_layers else None
    check_layers(out_dir, feature_layers)
    answers = None
    if answers_file is not None:
        answers = AnswerLog(answers_file, {"suffix": suffix, "max_new_tokens": max_new_tokens,
                                           "temperature": temperature})
        answers.add([{"id": sid, "answer": a} for sid, a in _stored_answers(out_dir, stored - set(answers.entries))])
    writer = _ShardWriter(out_dir, shard_size, {"feature_layers": json.dumps(feature_layers)})
    root = Path(images_root) if images_root is not None else None
    adapter = adapter_for(model)
    image_ids = set(adapter.image_token_ids())
    counts = {"written": 0, "skipped": 0, "already_done": len(samples) - len(todo), "replayed": 0}
    tok = _prepare_tokenizer(processor)
    gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
    if temperature > 0:
        gen_kw["temperature"] = temperature
    bar = tqdm(total=len(todo), desc="generating", unit="sample", disable=not progress)
    for start in range(0, len(todo), batch_size):
        full = todo[start : start + batch_size]
        known = {s.id: answers.entries[s.id] for s in full if answers is not None and s.id in answers}
        batch = []
        for s in full:
            entry = known.get(s.id, {})
            if entry.get("skip"):
                _log_skip(out_dir, s.id, f"answers file: {entry['skip']}")
            elif image_ids & set(entry.get("answer", [])):
                _log_skip(out_dir, s.id, "its logged answer holds an image placeholder id, which a forward by ids "
                                         "would take for an image")
            else:
                batch.append(s)
        loaded = _load_images(batch, root, out_dir)
        counts["skipped"] += len(full) - len(loaded)
        bar.update(len(full) - len(loaded))
        for group in _groups(loaded):
            for replay in (True, False):
                part = [x for x in group if (x[0].id in known) == replay]
                if not part:
                    continue
                inputs = _prompt_inputs(model, processor, adapter, part, suffix)
                if replay:  # prompt + the logged answer (padding after it), and one forward
                    ans = [known[s.id]["answer"] for s, _ in part]
                    width = max(map(len, ans))
                    tail = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in ans],
                                        dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
                    records = sequence_records(adapter, inputs, torch.cat([inputs["input_ids"], tail], 1),
                                               tok.pad_token_id, feature_layers)
                    counts["replayed"] += len(part)
                else:
                    # The prefill's input embeddings (image features merged) are captured on the way: the
                    # stored forward below reuses them instead of encoding the images again.
                    with adapter.capture_input_embeds() as box:
                        seqs = model.generate(**inputs, **gen_kw)
                    prompt_emb = box.get("inputs_embeds")
                    if prompt_emb is None or prompt_emb.shape[1] != inputs["input_ids"].shape[1]:
                        prompt_emb = adapter.embed(inputs["input_ids"])
                    records = sequence_records(adapter, inputs, seqs, tok.pad_token_id, feature_layers,
                                               prompt_embeds=prompt_emb)
                    if answers is not None:
                        answers.add([{"id": s.id, "answer": answer_of(r)} for (s, _), r in zip(part, records)])
                for (s, _), rec in zip(part, records):
                    writer.add(s.id, rec)
                    counts["written"] += 1
                    bar.update(1)
    writer.flush()
    bar.close()
    return counts


def _stored_answers(out_dir: Path, ids: set[str]):
    """(id, answer token ids) of the samples ``ids`` that the complete shards of ``out_dir`` hold."""
    from safetensors import safe_open

    for shard in sorted(out_dir.glob(SHARD_GLOB)):
        with safe_open(str(shard), "pt") as f:
            for k, sid in enumerate(json.loads(f.metadata()["ids"])):
                if sid in ids:
                    yield sid, answer_of({n: f.get_tensor(f"{k}.{n}") for n in ("input_ids", "loss_mask")})


def _log_skip(out_dir: Path, sid: str, reason: str) -> None:
    log.warning("skipping sample %s: %s", sid, reason)
    with open(out_dir / "skipped.jsonl", "a") as f:
        f.write(json.dumps({"id": sid, "reason": reason}) + "\n")


class ShardDataset(torch.utils.data.Dataset):
    """Samples of a ``generate_shards`` directory, each a dict of the stored tensors."""

    def __init__(self, data_dir):
        from safetensors import safe_open

        self.index = []
        shards = sorted(Path(data_dir).glob(SHARD_GLOB))
        if not shards:
            raise FileNotFoundError(f"no {SHARD_GLOB} in {data_dir}: run `vispec data generate` first")
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                ids = json.loads(f.metadata()["ids"])
            self.index += [(shard, k, sid) for k, sid in enumerate(ids)]
        layers = shard_layers(data_dir)
        if len(layers) > 1:
            raise ValueError(f"{data_dir} mixes shards written with different feature_layers: {layers}")
        # The target layers whose input hidden states the samples hold as ``aux_hidden`` (None: none).
        self.feature_layers = layers[0]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from safetensors import safe_open

        shard, k, sid = self.index[i]
        with safe_open(str(shard), "pt") as f:
            names = [n for n in f.keys() if n.startswith(f"{k}.")]
            out = {n.split(".", 1)[1]: f.get_tensor(n) for n in names}
        out["id"] = sid
        return out


class OnlineDataset(torch.utils.data.Dataset):
    """Samples whose records the frozen target computes when training reads them (``vispec train
    --online``): no hidden state is stored. The target answers every sample once, in batches, and the
    answers' token ids are kept in ``work_dir/answers-<rank>-of-<world>.jsonl`` (appended per batch, so
    an interrupted run resumes); each rank answers its share of the samples (rank r: every world-th one,
    from the r-th) and then reads the others'. A record is what :func:`generate_shards` would store,
    computed by one forward over prompt + answer (under bf16 autocast on a GPU).
    """

    def __init__(self, model, processor, samples: list[Sample], work_dir, images_root=None,
                 suffix: str = LONG_ANSWER_SUFFIX, max_new_tokens: int = 1024, temperature: float = 0.0,
                 batch_size: int = 4, feature_layers: list[int] | None = None, rank: int = 0, world: int = 1,
                 progress: bool = True, wait_s: float = 2.0):
        import time

        self.model, self.processor, self.adapter = model, processor, adapter_for(model)
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = Path(images_root) if images_root is not None else None
        self.suffix = suffix
        self.feature_layers = list(feature_layers) if feature_layers else None
        self.tok = _prepare_tokenizer(processor)
        config = {"suffix": suffix, "max_new_tokens": max_new_tokens, "temperature": temperature}
        mine = AnswerLog(self.work / f"answers-{rank}-of-{world}.jsonl", config)
        todo = [s for i, s in enumerate(samples) if i % world == rank and s.id not in mine]
        gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                      **({"temperature": temperature} if temperature > 0 else {}))
        bar = tqdm(total=len(todo), desc="answering", unit="sample", disable=not progress)
        image_ids = set(self.adapter.image_token_ids())
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            loaded = _load_images(batch, self.root, self.work)
            lines = [{"id": s.id, "skip": "unreadable image"} for s in batch if s not in [x[0] for x in loaded]]
            for group in _groups(loaded):
                inputs = _prompt_inputs(model, processor, self.adapter, group, suffix)
                with torch.inference_mode():
                    seqs = model.generate(**inputs, **gen_kw)
                p = inputs["input_ids"].shape[1]
                for r, (s, _) in enumerate(group):
                    ans = seqs[r, p:].tolist()
                    if self.tok.pad_token_id in ans:  # padding after EOS is not an answer
                        ans = ans[: ans.index(self.tok.pad_token_id)]
                    if image_ids & set(ans):  # a forward by ids would take it for an image placeholder
                        lines.append({"id": s.id, "skip": "the answer holds an image placeholder id"})
                    else:
                        lines.append({"id": s.id, "answer": ans})
            mine.add(lines)
            bar.update(len(batch))
        bar.close()
        (self.work / f"answers-{rank}-of-{world}.done").touch()
        while not all((self.work / f"answers-{r}-of-{world}.done").is_file() for r in range(world)):
            time.sleep(wait_s)  # the other ranks' shares
        answers = {}
        for r in range(world):
            log_r = AnswerLog(self.work / f"answers-{r}-of-{world}.jsonl", config)
            answers.update({sid: e.get("answer") for sid, e in log_r.entries.items()})
        self.samples = [s for s in samples if answers.get(s.id)]
        self.answers = {s.id: answers[s.id] for s in self.samples}

    def __len__(self):
        return len(self.samples)

    def answer_tokens(self) -> list[list[int]]:
        """Every sample's answer ids (what a draft vocabulary is chosen from), without any forward."""
        return [self.answers[s.id] for s in self.samples]

    def __getitem__(self, i):
        s = self.samples[i]
        (loaded,) = _load_images([s], self.root, self.work) or [None]
        if loaded is None:
            raise FileNotFoundError(f"sample {s.id}: its image {s.image} became unreadable after it was answered")
        inputs = _prompt_inputs(self.model, self.processor, self.adapter, [loaded], self.suffix)
        ans = torch.tensor([self.answers[s.id]], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
        seqs = torch.cat([inputs["input_ids"], ans], 1)
        cuda = seqs.device.type == "cuda"
        # no_grad, not inference_mode: the records feed the drafter's autograd graph.
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            rec = sequence_records(self.adapter, inputs, seqs, None, self.feature_layers)[0]
        rec["id"] = s.id
        return rec
