"""The offline demo: a small VLM built on SmolLM2-135M-Instruct that describes procedurally generated scenes,
with three drafters trained for it (ViSpec, EAGLE-2, HiViS) by the project's own pipeline.

    model, processor = build_demo_vlm()          # seconds, no network; 576 image tokens per image
    drafter = load_demo_drafter("vispec", model)  # the shipped drafter for that model's image-token count
    model36, _ = build_demo_vlm(image_tokens=36)  # the first demo's 36-token model (its drafters ship too)

Seeds: the vision side trained on scenes with seeds below ``EVAL_SEED`` (10**7); the drafters'
data uses seeds from ``DRAFT_DATA_SEED``; held-out evaluation and benchmarks use seeds from
``EVAL_SEED`` (never seen by either).
"""
from __future__ import annotations

from pathlib import Path

from .model import (DEFAULT_IMAGE_TOKENS, IMAGE_TOKEN, WEIGHTS, WEIGHTS_DIR, build_demo_vlm, check_image_tokens, image_tokens_of, prompt,
                    vision_state_dict)

HERE = Path(__file__).parent
DRAFTERS_DIR = WEIGHTS_DIR
DEMO_IMAGE = HERE / "assets" / "scene.png"
DEMO_PROMPT = "Describe the image."
# Questions the drafters' data and the benchmark pair with images, in turn. The vision side learned only the
# first; the others get the frozen LM's own phrasing. Two carry ViSpec's long-answer suffix.
PROMPTS = ("Describe the image.", "What do you see in this picture?", "Describe the image in detail.",
           "List the shapes in the image and where they are.",
           "Describe the image. Please answer with at least 1000 words.",
           "What do you see in this picture? Please answer with at least 1000 words.")
EVAL_SEED = 10**7
DRAFT_DATA_SEED = 2 * 10**7
DRAFTER_KINDS = ("vispec", "eagle", "hivis")
DEMO_IMAGE_SEED = EVAL_SEED + 1001  # assets/scene.png: held out, outside the benchmark's images; 2 shapes + a word
# Draft trees (total tokens, depth, top-k) for this 135M target on a CPU, where a verification forward over
# the tree costs about its token count in compute: small trees pay off (see benchmarks/results/e2e-demo*).
# Greedy, the drafters' top-1 agrees with the target's often (0.82-0.87 at depth 1), so a deep tree pays;
# at T=1 the target's distribution is flat and a draft is accepted with its probability under it, so wide
# and shallow pays: (8, 2, 6) beat (12, 5, 4) at T=1 on the 576-token model (benchmarks/results/
# e2e-demo-576-sampled-tree-cpu.md), and the greedy tree is the one every drafter is trained and compared on.
DEMO_TREE = (12, 5, 4)
DEMO_TREE_SAMPLED = (8, 2, 6)


def demo_tree(temperature: float = 0.0) -> tuple[int, int, int]:
    """The demo's draft tree for a temperature (see ``DEMO_TREE``)."""
    return DEMO_TREE if temperature == 0 else DEMO_TREE_SAMPLED


KIND_NAMES = {"vispec": "ViSpec", "eagle": "EAGLE-2", "hivis": "HiViS"}
GENERATION_SUFFIX = {2: "", 3: "-eagle3"}  # a drafter's folder: its kind, then its head's generation


def drafter_dir_name(kind: str, generation: int = 2) -> str:
    return kind + GENERATION_SUFFIX[generation]


def drafter_label(name: str) -> str:
    """A drafter folder's name for tables: "ViSpec", "EAGLE-2", "ViSpec (EAGLE-3 head)", ..."""
    for gen, suffix in GENERATION_SUFFIX.items():
        if suffix and name.endswith(suffix):
            return f"{KIND_NAMES[name[: -len(suffix)]]} (EAGLE-3 head)"
    return KIND_NAMES.get(name, name)


def drafter_names(generations=(2,)) -> list[str]:
    return [drafter_dir_name(k, g) for g in generations for k in DRAFTER_KINDS]


def drafters_dir(image_tokens: int = DEFAULT_IMAGE_TOKENS) -> Path:
    """Where the package keeps the drafters of the demo VLM with ``image_tokens`` image tokens per image."""
    return DRAFTERS_DIR if check_image_tokens(image_tokens) == 36 else DRAFTERS_DIR / f"drafters-{image_tokens}"


def drafter_path(kind: str, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> Path:
    if kind not in DRAFTER_KINDS:
        raise ValueError(f"unknown demo drafter {kind!r}; choose from {', '.join(DRAFTER_KINDS)}")
    return drafters_dir(image_tokens) / kind


def load_demo_drafter(kind: str, model):
    """One of the shipped drafters of the demo VLM ``model`` (from :func:`build_demo_vlm`; its image-token count
    picks the folder), bound to it."""
    from ..drafters import load_drafter

    path = drafter_path(kind, image_tokens_of(model))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no drafter; rebuild them with `python -m vispec.demo.build_drafters`")
    return load_drafter(path, model)


__all__ = ["build_demo_vlm", "load_demo_drafter", "prompt", "vision_state_dict", "drafter_path", "drafters_dir", "DEMO_IMAGE",
           "DEMO_PROMPT", "DEMO_TREE", "DEMO_TREE_SAMPLED", "demo_tree", "PROMPTS", "EVAL_SEED", "DRAFT_DATA_SEED", "DRAFTER_KINDS", "IMAGE_TOKEN", "WEIGHTS",
           "drafter_dir_name", "drafter_label", "drafter_names"]
