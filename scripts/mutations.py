"""Mutation check: break the engine, sampler, drop-in and verification code on purpose, one targeted
mutation at a time, and run the tests that guard that code. Every mutation must make them fail; a
mutation that survives names a test gap.

    python scripts/mutations.py            # all mutations (C++ ones rebuild the extension: ~1 min each)
    python scripts/mutations.py --list
    python scripts/mutations.py --only ignore-do-sample,drop-top-p

Each file is restored after its mutation (also on Ctrl-C), and the extension is rebuilt once more
at the end if a C++ source was mutated. Exit status: 0 when every mutation was caught.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments
    why: str


ENGINE = ("tests/test_engine.py",)
SAMPLING = ("tests/test_engine.py", "-k", "sampl")
MUTATIONS = [
    Mutation("ignore-do-sample", "vispec/accelerate.py", 'sample = bool(get("do_sample"))', "sample = False",
             ENGINE, "the drop-in decodes greedily whatever do_sample says"),
    Mutation("no-generate-top-k-default", "vispec/accelerate.py", "top_k=int(top_k) if sample and top_k else None",
             "top_k=None", ENGINE, "the drop-in samples without transformers' default top_k=50"),
    Mutation("drop-top-p", "vispec/sampler.py", "self.top_p, generator=self.generator",
             "None, generator=self.generator", SAMPLING, "verification ignores top_p"),
    Mutation("verify-at-temperature-1", "vispec/sampler.py", "float(self.temperature), self.top_k",
             "1.0, self.top_k", SAMPLING, "verification uses the unscaled target distribution"),
    Mutation("first-token-greedy", "vispec/sampler.py", "        if self.greedy:\n            return logits.float().argmax(-1)",
             "        if True:\n            return logits.float().argmax(-1)", SAMPLING,
             "the first token is always the argmax, even when sampling"),
    Mutation("accept-one-more", "vispec/engine.py", "self.drafter.extend(out, feats, torch.where(done, 0, alen + 1))\n        return out, alen",
             "alen = alen + (alen < self.tree.depth).long()\n        self.drafter.extend(out, feats, torch.where(done, 0, alen + 1))\n        return out, alen",
             ENGINE, "off by one in the accepted length"),
    Mutation("compact-one-too-few", "vispec/engine.py", "self.cache.compact_(path, alen, active=~done)",
             "self.cache.compact_(path, (alen - 1).clamp(min=0), active=~done)", ENGINE,
             "KV compaction keeps one accepted position too few"),
    Mutation("tree-positions-off-by-one", "vispec/models/base.py", "return lens.unsqueeze(1) + depth  # (B, N)",
             "return lens.unsqueeze(1) + depth + 1  # (B, N)", ENGINE, "tree nodes at the wrong RoPE positions"),
    Mutation("no-rope-deltas", "vispec/models/qwen_vl.py", ".unsqueeze(0) + state.to(lens.device).unsqueeze(2)",
             ".unsqueeze(0).expand(3, -1, -1)", ENGINE, "Qwen-VL tree positions without the M-RoPE offset"),
    Mutation("ttt-sees-all-steps", "vispec/drafters/eagle.py", "visible = torch.cat([vis0] + [diag] * j, -1)",
             "visible = torch.cat([vis0] * (j + 1), -1)", ("tests/test_eagle3.py",),
             "the training-time test lets a step see other positions' draft steps (not what drafting sees)"),
    Mutation("capture-previous-layer", "vispec/models/base.py",
             "handles.append(mods[i].register_forward_pre_hook(hook, with_kwargs=True))",
             "handles.append(mods[max(i - 1, 0)].register_forward_pre_hook(hook, with_kwargs=True))",
             ("tests/test_eagle3.py",), "EAGLE-3 drafters read the wrong target layers"),
    Mutation("hivis-no-selection", "vispec/train.py", "alive[rows] = hit", "alive[rows] = True", ("tests/test_hivis.py",),
             "HiViS's dynamic data selection keeps every chain"),
    Mutation("hivis-one-residual", "vispec/drafters/hivis.py", "return self.residual[min(step, self.residual.shape[0] - 1)]",
             "return self.residual[0]", ("tests/test_hivis.py",), "HiViS's residuals ignore the draft step"),
    Mutation("no-sliding-window", "vispec/attention.py", 'window = kwargs.get("sliding_window") or 0', "window = 0",
             ENGINE, "tree attention ignores a sliding-window layer's window"),
    Mutation("no-logit-softcap", "vispec/models/base.py", "return logits if cap is None else", "return logits if True else",
             ("tests/test_engine.py", "-k", "softcap"), "verification without the model's final logit softcapping"),
    Mutation("ignore-eos", "vispec/engine.py", "if t in self.eos or len(self.tokens[r]) >= self.max_new:",
             "if len(self.tokens[r]) >= self.max_new:", ENGINE, "generation runs past EOS"),
    Mutation("one-token-too-many", "vispec/engine.py", "len(self.tokens[r]) >= self.max_new:",
             "len(self.tokens[r]) > self.max_new:", ENGINE, "max_new_tokens + 1 tokens"),
    Mutation("reuse-uniform", "csrc/cpu/verify.cpp", "sample_residual(dist, uni[b * N], rejected)",
             "sample_residual(dist, uni[b * N + std::max<int64_t>(cur, 1)], rejected)",
             ("tests/test_verify.py", "-k", "distribution or law or sampling"),
             "the bonus reuses an acceptance coin"),
    Mutation("no-renormalisation", "csrc/cpu/verify.cpp", "mass = std::max(mass - p, 0.0);", "mass = 1.0;",
             ("tests/test_verify.py", "-k", "distribution or law or sampling"),
             "rejection without renormalising the residual"),
    Mutation("skip-tied-chunks", "csrc/cpu/verify.cpp", "if (!(chunk_max[c] >= floor) || chunk_max[c] == kNegInf) continue;",
             "if (!(chunk_max[c] > floor) || chunk_max[c] == kNegInf) continue;",
             ("tests/test_verify.py", "-k", "sampling"), "the survivor scan drops chunks whose maximum ties the top-k value"),
    Mutation("attn-fast-no-window", "csrc/cpu/tree_attention.cpp", "if (window > 0 && t0 < sc.first_key[r]) {",
             "if (false && window > 0 && t0 < sc.first_key[r]) {", ("tests/test_tree_attention.py",),
             "the AVX-512 tree attention ignores the sliding window"),
    Mutation("attn-bf16-pairs-wrong", "csrc/cpu/tree_attention.cpp",
             "_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16))", "_mm512_or_si512(lo, _mm512_slli_epi32(lo, 16))",
             ("tests/test_tree_attention.py",), "the bf16 P.V pairs a key's V with itself instead of the next key's"),
]


def rebuild() -> None:
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"rebuilding the extension failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")


def run(m: Mutation) -> tuple[bool, float]:
    path = ROOT / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the text to mutate occurs {original.count(m.old)} times in {m.file} (expected 1); "
                         "update scripts/mutations.py")
    t0 = time.time()
    try:
        path.write_text(original.replace(m.old, m.new))
        if m.file.endswith(".cpp"):
            rebuild()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    finally:
        path.write_text(original)
    return rc not in (0, 5), time.time() - t0  # 5: no test collected is not a catch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutations {unknown}; --list shows them")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file:28} {m.why}")
        return 0
    survived = []
    print(f"{'mutation':28} {'result':8} {'seconds':>8}  what it breaks")
    try:
        for m in chosen:
            caught, secs = run(m)
            print(f"{m.name:28} {'caught' if caught else 'SURVIVED':8} {secs:8.0f}  {m.why}", flush=True)
            if not caught:
                survived.append(m.name)
    finally:
        if any(m.file.endswith(".cpp") for m in chosen):
            rebuild()
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
