"""Training a drafter (EAGLE, ViSpec or HiViS) on shards from ``vispec data generate``.

Teacher forcing, as in EAGLE / ViSpec: the drafter reads the target's features and
the next tokens' embeddings over a whole stored sequence and predicts, at each of its
positions i, the target's next feature f_{i+1} and hence the next token's
distribution softmax(lm_head(f_{i+1})). Losses (weights per stage, all configurable):

                                                                       stage 1  stage 2  "hivis"
    feature   SmoothL1(pred_i, f_{i+1})                                  1.0      0        1.0
    soft CE   -sum_v p_target(v) log p_draft(v)                          0.1      0        0.1
    prob L1   sum_v |p_draft(v) - p_target(v)|                           0        10       0
    ListMLE   -log Plackett-Luce likelihood of the target's top-10       0        0.1      0
              order under the draft's log-probabilities
    top-k CE  soft CE against the target renormalised over its top-10    0        0        1.0

(stage 2 is ViSpec's own objective: 10 x probability L1 + 0.1 x a listwise ranking loss over
the target's top-10)
on the positions whose next token is part of the generated answer. EAGLE feature
noise (U - 0.5) * 0.2 * 512 / seq_len is added to the input features. The
self-correction passes (``passes`` > 1) rerun the sequence with the drafter's own
predicted features, shifted right by one, in place of the target's (f_0 kept), and
add their losses; gradients flow through all passes.

EAGLE-3 heads (generation 3) have no feature to regress: stage 1 is the soft CE alone,
and they train with EAGLE-3's **training-time test** instead of self-correction passes:
the drafter is unrolled ``ttt_steps`` (7) times on its own outputs
(:meth:`EagleDrafter.forward_sequence`), step j scored against the target's
distribution j tokens further on with weight 0.8^j; with a draft vocabulary, positions
where the target's choice lies outside it are left out (EAGLE-3's position mask). Stage
2's L1 + ListMLE apply per step the same way. No feature noise (EAGLE-3 adds none).

Stage "hivis" is HiViS's stage 2 (multi-step self-feedback with dynamic data selection, see
:mod:`vispec.drafters.hivis`): the same unroll over 3 steps, with ``select_topk`` = 5 (a position leaves
the later steps' loss once the drafter's top-5 misses the target's top-1), on either head. AdamW (0.9, 0.95), linear
warmup then linear decay, gradient clipping, bf16 autocast on GPUs; one device or
several through ``accelerate launch`` / torchrun (DDP via accelerate).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .drafters.base import PrefillInputs

STAGES = {
    1: dict(w_feature=1.0, w_ce=0.1, w_l1=0.0, w_rank=0.0, w_topk=0.0),
    2: dict(w_feature=0.0, w_ce=0.0, w_l1=10.0, w_rank=0.1, w_topk=0.0),
    # HiViS's stage 2 (release: multi-step self-feedback): feature + 0.1 soft CE + CE over the target's top-10
    "hivis": dict(w_feature=1.0, w_ce=0.1, w_l1=0.0, w_rank=0.0, w_topk=1.0),
}
# Stage-specific defaults of the options left None in TrainConfig (over the generation's, below).
# HiViS's release weighs its 3 self-fed steps alike (no 0.8^j decay).
STAGE_OPTIONS = {"hivis": dict(passes=1, ttt_steps=3, select_topk=5, ttt_decay=1.0)}
# EAGLE-3 heads: what differs from the table above (no feature regression: their output is no target feature).
EAGLE3_STAGES = {1: dict(w_feature=0.0, w_ce=1.0), "hivis": dict(w_feature=0.0)}
# Per drafter generation: the defaults of the options left None in TrainConfig.
GENERATION_DEFAULTS = {
    2: dict(passes=2, ttt_steps=1, noise=True, select_topk=0, ttt_decay=0.8),
    3: dict(passes=1, ttt_steps=7, noise=False, select_topk=0, ttt_decay=0.8),
}
RANK_TOP = 10  # ListMLE ranks the target's 10 most likely tokens (ViSpec)


def topk_ce(draft_logp: torch.Tensor, target_logp: torch.Tensor, k: int = RANK_TOP) -> torch.Tensor:
    """HiViS's top-k loss: the soft cross-entropy's terms at the target's k most likely tokens, rows (T, V):
    -sum over those tokens of p_target * log p_draft, with the target's probabilities as they are (the release
    does not renormalise them over the k)."""
    top, idx = target_logp.topk(min(k, target_logp.shape[-1]), -1)
    return -(top.exp() * torch.gather(draft_logp, -1, idx)).sum(-1).mean()


def listmle(draft_logp: torch.Tensor, target_logp: torch.Tensor, k: int = RANK_TOP) -> torch.Tensor:
    """ListMLE (Xia et al., 2008): mean over rows of -log P(target's top-k order) under a Plackett-Luce
    model scored by the draft's log-probabilities, rows (T, V). Term j: logsumexp(s[j:]) - s[j]."""
    order = target_logp.topk(min(k, target_logp.shape[-1]), -1).indices  # (T, k), most likely first
    s = torch.gather(draft_logp, -1, order)
    tail = torch.logcumsumexp(s.flip(-1), -1).flip(-1)  # logsumexp over positions j..k-1
    return (tail - s).sum(-1).mean()


@dataclass
class TrainConfig:
    stage: int | str = 1  # a key of STAGES: 1, 2 (ViSpec's) or "hivis"
    epochs: int = 20
    lr: float = 3e-5
    warmup_steps: int | None = None  # default: one epoch of steps (ViSpec)
    batch_size: int = 1
    grad_clip: float = 0.5
    weight_decay: float = 0.0
    passes: int | None = None  # 1 = no self-correction pass; None: the generation's default
    noise: bool | None = None
    ttt_steps: int | None = None  # training-time test unroll (EAGLE-3: 7); 1 = teacher forcing only
    ttt_decay: float | None = None  # weight of unroll step j: ttt_decay ** j (EAGLE-3: 0.8)
    # > 0: dynamic data selection (HiViS): a position stays in later unroll steps' loss only while the target's
    # top-1 token is among the drafter's top ``select_topk`` at every earlier step.
    select_topk: int | None = None
    w_feature: float | None = None
    w_ce: float | None = None
    w_l1: float | None = None
    w_rank: float | None = None
    w_topk: float | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 on CUDA, none on CPU
    log_every: int = 10

    def weights(self, generation: int = 2):
        base = {**STAGES[self.stage], **(EAGLE3_STAGES.get(self.stage, {}) if generation == 3 else {})}
        w = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        if generation == 3 and w["w_feature"]:
            raise ValueError("an EAGLE-3 head's output is not a target feature: w_feature must be 0")
        return w

    def options(self, generation: int = 2) -> dict:
        """passes / ttt_steps / noise / select_topk / ttt_decay for a drafter of ``generation`` (None: the
        stage's default, else the generation's)."""
        base = {**GENERATION_DEFAULTS[generation], **STAGE_OPTIONS.get(self.stage, {})}
        opts = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        for k in ("passes", "ttt_steps"):
            if not isinstance(opts[k], int) or opts[k] < 1:
                raise ValueError(f"TrainConfig.{k} must be an int >= 1, got {opts[k]!r}")
        if not 0 < opts["ttt_decay"] <= 1:
            raise ValueError(f"TrainConfig.ttt_decay must be in (0, 1], got {opts['ttt_decay']!r}")
        if generation == 3 and opts["passes"] > 1:
            raise ValueError("self-correction passes feed the drafter's outputs back as target features, which an "
                             "EAGLE-3 head does not read (it fuses three layers): use ttt_steps")
        if opts["passes"] > 1 and opts["ttt_steps"] > 1:
            raise ValueError("self-correction passes and the training-time test are two ways of feeding the drafter "
                             "its own outputs: set passes=1 or ttt_steps=1")
        return opts


def answer_vocab(dataset, model, size: int) -> list[int]:
    """The ``size`` most frequent answer tokens of ``dataset`` (shards from ``vispec data generate``),
    the target's EOS ids always included: a draft vocabulary for ``drafter.set_draft_vocab``."""
    from .drafters.eagle import EagleDrafter
    from .seq import eos_list

    if hasattr(dataset, "answer_tokens"):  # an OnlineDataset: its answers without a target forward each
        answers = dataset.answer_tokens()
    else:
        answers = (r["input_ids"][r["loss_mask"].bool()] for r in dataset)
    return EagleDrafter.frequent_tokens(answers, size, always=eos_list(model.generation_config.eos_token_id))


def sample_to_inputs(rec: dict, embed, feature_layers: list[int] | None = None) -> tuple[PrefillInputs, dict]:
    """A stored sample as the drafter's prefill view of the whole sequence, plus the training targets.

    Drafter position i pairs f_i with token i+1's embedding (i < L-1) and is scored against f_{i+1}.
    With ``feature_layers`` (EAGLE-3) the drafter reads the stored ``aux_hidden`` instead of f.
    """
    ids = rec["input_ids"].long()
    n = ids.shape[0]
    dtype = embed.weight.dtype  # the drafter runs in the target's dtype; hidden states were stored in bf16
    hidden = rec["hidden"].to(dtype)
    feats = hidden
    if feature_layers:
        if "aux_hidden" not in rec:
            raise ValueError(f"sample {rec.get('id', '?')!r} holds no aux_hidden: the drafter reads the target's "
                             f"layers {feature_layers}; generate its data with --feature-layers "
                             f"{','.join(map(str, feature_layers))}")
        feats = rec["aux_hidden"].to(dtype)
    emb = embed(ids.to(embed.weight.device))
    img = rec["image_mask"].bool()
    if img.any():
        emb = emb.clone()
        emb[img.to(emb.device)] = rec["image_embeds"].to(emb.device, emb.dtype)
    dev = emb.device
    inputs = PrefillInputs(
        input_ids=ids[:-1].unsqueeze(0).to(dev),
        inputs_embeds=emb[:-1].unsqueeze(0),
        features=feats[:-1].unsqueeze(0).to(dev, emb.dtype),
        lengths=torch.tensor([n - 1], device=dev),
        next_tokens=ids[-1:].to(dev),
        image_mask=img[:-1].unsqueeze(0).to(dev),
    )
    targets = dict(next_features=hidden[1:].to(dev, emb.dtype), loss_mask=rec["loss_mask"][1:].bool().to(dev),
                   embeds=emb)
    return inputs, targets


def drafter_forward(drafter, inputs: PrefillInputs, features_override=None):
    """Teacher-forced drafter outputs over a prompt-like sequence: (hidden (T, H), original positions (T,))."""
    if features_override is not None:
        inputs = PrefillInputs(**{**inputs.__dict__, "features": features_override})
    hidden, pos = drafter.forward_sequence(inputs)
    return hidden[0], pos


def step_loss(drafter, rec, cfg: TrainConfig, embed, generator=None):
    """Total loss of one sample over all passes (or unroll steps), and its parts (floats) for logging.

    Distributions are over the drafter's vocabulary: the whole vocabulary, or the draft vocabulary
    with the target's (``drafter.target_logits``) renormalised over it."""
    layers = getattr(drafter, "feature_layers", None)
    inputs, tg = sample_to_inputs(rec, embed, layers)
    gen = drafter.config.generation
    w, opts = cfg.weights(gen), cfg.options(gen)
    feats = inputs.features
    if opts["noise"]:
        u = torch.rand(feats.shape, generator=generator, device="cpu").to(feats.device, feats.dtype)
        inputs = PrefillInputs(**{**inputs.__dict__, "features": feats + (u - 0.5) * 0.2 * 512 / feats.shape[1]})
    answer = tg["loss_mask"]
    with torch.no_grad():
        target_logp = torch.log_softmax(drafter.target_logits(tg["next_features"]).float(), -1)  # (L-1, V)
        if gen == 3 and drafter.d2t is not None and bool(answer.any()):
            # EAGLE-3's position mask: where the target's own choice is outside the draft vocabulary,
            # no draft token can be right, so the position teaches nothing.
            full = drafter.target_head(tg["next_features"][answer]).argmax(-1)
            keep = torch.zeros_like(answer)
            keep[answer] = torch.isin(full, drafter.d2t.to(full.device))
            answer = keep
    parts = {"feature": 0.0, "ce": 0.0, "l1": 0.0, "rank": 0.0, "topk": 0.0, "scored": 0}  # scored: (position, step) pairs

    def losses(hid, pos, weight=1.0, rows=None):
        """The weighted losses of outputs hid (T, H) scored against the target at positions pos (T,) (only
        ``rows`` (T,) bool, when given)."""
        ok = pos < target_logp.shape[0] if rows is None else rows & (pos < target_logp.shape[0])
        mask = ok & answer[pos.clamp(max=target_logp.shape[0] - 1)]
        if not bool(mask.any()):
            return None
        pred, at = hid[mask], pos[mask]
        tlp = target_logp[at]
        dlp = torch.log_softmax(drafter.logits(pred).float(), -1)
        tp = tlp.exp()
        l_feat = F.smooth_l1_loss(pred.float(), tg["next_features"][at].float()) if w["w_feature"] else tp.new_zeros(())
        l_ce = -(tp * dlp).sum(-1).mean()
        l_l1 = (dlp.exp() - tp).abs().sum(-1).mean()
        l_rank = listmle(dlp, tlp) if w["w_rank"] else l_l1.new_zeros(())
        l_topk = topk_ce(dlp, tlp) if w["w_topk"] else l_l1.new_zeros(())
        for k, v in (("feature", l_feat), ("ce", l_ce), ("l1", l_l1), ("rank", l_rank), ("topk", l_topk)):
            parts[k] += weight * float(v.detach())
        parts["scored"] += int(mask.sum())
        return weight * (w["w_feature"] * l_feat + w["w_ce"] * l_ce + w["w_l1"] * l_l1 + w["w_rank"] * l_rank
                         + w["w_topk"] * l_topk)

    total = 0.0
    if opts["ttt_steps"] > 1:
        steps = opts["ttt_steps"]
        scored = answer.nonzero()
        start = int(scored[0]) - (steps - 1) if len(scored) else 0  # earlier positions are never scored past step 0
        hid, pos = drafter.forward_sequence(inputs, steps=steps, embeds=tg["embeds"], unroll_from=start)
        alive = pos >= start  # the chains still scored (dynamic data selection drops some)
        last = target_logp.shape[0] - 1
        for j in range(steps):  # step j predicts j tokens further on
            term = losses(hid[j], pos + j, opts["ttt_decay"] ** j, alive)
            if term is not None:
                total = total + term
            if opts["select_topk"] and j + 1 < steps and bool(alive.any()):
                with torch.no_grad():  # keep a chain while the drafter's top-k holds the target's choice
                    rows = alive.nonzero().squeeze(1)
                    top1 = target_logp[(pos[rows] + j).clamp(max=last)].argmax(-1, keepdim=True)
                    k = min(opts["select_topk"], target_logp.shape[-1])
                    hit = (drafter.logits(hid[j][rows]).float().topk(k, -1).indices == top1).any(-1)
                    alive = alive.clone()
                    alive[rows] = hit
    else:
        override = None
        for i in range(opts["passes"]):
            hid, pos = drafter_forward(drafter, inputs, override)
            term = losses(hid, pos)
            if term is None:
                break
            total = total + term
            if i + 1 == opts["passes"]:
                break
            # Self-correction: the next pass reads the drafter's own predictions as features, shifted right
            # by one (position i gets the prediction made at the position before it; f_0 stays the target's).
            nxt = inputs.features.clone()
            tgt_pos = pos + 1
            ok = tgt_pos < nxt.shape[1]
            nxt[0, tgt_pos[ok]] = hid[ok].to(nxt.dtype)
            override = nxt
    if not isinstance(total, torch.Tensor):
        # No answer position in this sample: a zero loss that still touches every parameter, so that under
        # DDP every rank runs a backward (a rank that skipped it would leave the others waiting).
        total = sum(p.sum() for p in drafter.parameters()) * 0.0
    return total, parts


class _TrainStep(torch.nn.Module):
    """One sample's whole multi-pass loss as a module forward, so that DDP (through accelerate) sees
    exactly one forward per backward and all-reduces the drafter's gradients."""

    def __init__(self, drafter, cfg: TrainConfig, embed):
        super().__init__()
        self.drafter = drafter
        self.cfg = cfg
        self._frozen = (embed,)  # the target's, not a parameter of this module

    def forward(self, rec, generator):
        return step_loss(self.drafter, rec, self.cfg, self._frozen[0], generator)


def evaluate_tau(model, drafter, eval_inputs: list[dict], max_new_tokens: int = 64, tree=None) -> float:
    """Mean accepted draft tokens per target forward (bonus excluded) with the real engine, greedy."""
    from .engine import generate

    acc = steps = 0
    was_training = drafter.training
    drafter.eval()
    try:
        for inp in eval_inputs:
            out = generate(model, drafter, **inp, max_new_tokens=max_new_tokens, tree=tree)
            acc += out.stats.accepted_draft_tokens
            steps += out.stats.row_steps
    finally:
        drafter.train(was_training)
    return acc / max(steps, 1)


def train(
    model,
    drafter,
    dataset,
    cfg: TrainConfig,
    out_dir,
    eval_inputs: list[dict] | None = None,
    eval_tokens: int = 64,
    tree=None,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
    eval_every: int = 1,
) -> dict:
    """Trains ``drafter`` in place; checkpoints under out_dir/checkpoint-*/ (resumable), final in out_dir/final.

    Returns {"steps", "tau_history": [(epoch, tau), ...], "last_loss"}: held-out tau after every
    ``eval_every``-th epoch and the last. ``max_steps`` stops early (after saving), which is how an
    interruption is simulated.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import get_linear_schedule_with_warmup

    out_dir = Path(out_dir)
    layers = getattr(drafter, "feature_layers", None)
    stored = getattr(dataset, "feature_layers", layers)  # a plain list of samples: checked per sample
    if layers is not None and stored != layers:
        raise ValueError(f"the drafter reads the target's layers {layers}; the dataset holds "
                         f"{'no aux_hidden' if stored is None else f'layers {stored}'}")
    cfg.weights(drafter.config.generation), cfg.options(drafter.config.generation)  # bad settings: refused now
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    # The vision adaptor gets no gradient from text-only samples: let DDP tolerate unused parameters.
    # cpu=True without a GPU lets torchrun / accelerate launch run DDP over gloo on CPU processes too.
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    n = len(dataset)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else steps_per_epoch
    sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
    stepper, opt, sched = accelerator.prepare(_TrainStep(drafter, cfg, embed), opt, sched)
    core = accelerator.unwrap_model(stepper).drafter

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "tau_history": []}
    ckpts = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if resume else []
    if ckpts:
        accelerator.load_state(str(ckpts[-1]))
        state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if ckpts:
        gen.set_state(torch.load(ckpts[-1] / "noise_rng.pt", weights_only=True))

    def save():
        ck = out_dir / f"checkpoint-{state['global_step']}"
        accelerator.save_state(str(ck))
        if accelerator.is_main_process:
            (ck / "trainer_state.json").write_text(json.dumps(state))
            torch.save(gen.get_state(), ck / "noise_rng.pt")
            (ck / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    stepper.train()
    last = None
    bar = tqdm(total=total_steps, initial=state["global_step"], desc=f"train {core.drafter_type()}",
               disable=not (progress and accelerator.is_local_main_process))
    stopped = False
    while state["epoch"] < cfg.epochs and not stopped:
        order = list(range(n))
        random.Random(cfg.seed * 1000 + state["epoch"]).shuffle(order)  # same order after a resume
        shard = order[accelerator.process_index :: accelerator.num_processes]
        batches = [shard[i : i + cfg.batch_size] for i in range(0, len(shard), cfg.batch_size)]
        for bi in range(state["step_in_epoch"], len(batches)):
            opt.zero_grad()
            loss_sum, parts = 0.0, None
            for idx in batches[bi]:
                with accelerator.autocast():
                    loss, parts = stepper(dataset[idx], gen)
                accelerator.backward(loss / len(batches[bi]))
                loss_sum += float(loss.detach()) / len(batches[bi])
            if cfg.grad_clip:
                accelerator.clip_grad_value_(stepper.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            state["global_step"] += 1
            state["step_in_epoch"] = bi + 1
            last = loss_sum
            bar.update(1)
            if state["global_step"] % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss_sum:.4f}", **({"tau": f"{state['tau_history'][-1][1]:.2f}"} if state["tau_history"] else {}))
            if max_steps is not None and state["global_step"] >= max_steps:
                save()
                stopped = True
                break
        if stopped:
            break
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if eval_inputs and (state["epoch"] % eval_every == 0 or state["epoch"] == cfg.epochs):
            tau = evaluate_tau(model, core, eval_inputs, eval_tokens, tree)
            state["tau_history"].append((state["epoch"], tau))
            bar.set_postfix(loss=f"{last:.4f}" if last is not None else "-", tau=f"{tau:.2f}")
        save()
    bar.close()
    if not stopped and accelerator.is_main_process:
        core.save_pretrained(out_dir / "final")
    return {"steps": state["global_step"], "tau_history": state["tau_history"], "last_loss": last}
