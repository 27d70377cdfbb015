"""Procedurally generated images with known content, for the offline demo VLM.

A scene is a square picture (96 x 96 by default; drawn at the vision tower's input size, so
that a 336-pixel tower sees sharp outlines rather than an upsampled 96-pixel image) of 1-3
coloured shapes in the cells of a 3 x 3 grid, optionally with a short word written in its
free space. Its content depends on the seed only, never on the size. Its description names every
fact (how many shapes; each shape's colour, kind and place; the word), so a model's
answer can be scored fact by fact.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

SIZE = 96
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
PLACES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
WORDS = ("cat", "sun", "dog", "car", "sea", "red", "box", "hat")
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass
class Scene:
    objects: list[tuple[str, str, str]]  # (colour, shape, place)
    word: str | None = None
    word_place: str | None = None
    image: Image.Image = field(default=None, repr=False)

    def description(self) -> str:
        parts = [f"{_a(c)} {c} {s} {_at(p)}" for c, s, p in self.objects]
        n = len(self.objects)
        listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text = f"The image shows {NUMBERS[n]} shape{'s' if n > 1 else ''}: {listed}."
        if self.word:
            text += f' The word "{self.word}" is written {_at(self.word_place)}.'
        return text

    def facts(self) -> list[str]:
        """Fact units a correct description states: the count, each object's colour+shape and its place, the word."""
        out = [f"count={len(self.objects)}"]
        for c, s, p in self.objects:
            out += [f"object={c} {s}", f"place={c} {s}@{p}"]
        if self.word:
            out.append(f"word={self.word}")
        return out


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _at(place: str) -> str:
    return "in the center" if place == "center" else f"at the {place}"


def make_scene(rng: random.Random, with_word: float = 0.5, size: int = SIZE) -> Scene:
    n = rng.randint(1, 3)
    cells = rng.sample(range(9), n + 1)
    objects = []
    used = set()
    for cell in sorted(cells[:n]):  # reading order: one right description, not n! of them
        while True:  # no two identical (colour, shape) pairs, so every fact is unambiguous
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if (c, s) not in used:
                used.add((c, s))
                break
        objects.append((c, s, PLACES[cell]))
    word = rng.choice(WORDS) if rng.random() < with_word else None
    scene = Scene(objects, word, PLACES[cells[n]] if word else None)
    scene.image = render(scene, rng, size)
    return scene


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """The scene drawn at size x size pixels. Every length is the 96-pixel layout's times size / 96 and
    the random draws are the same at every size, so one seed is one picture at any resolution."""
    if size < SIZE:
        raise ValueError(f"scenes are drawn at {SIZE} pixels or more, not {size}")
    rng = rng or random.Random(0)
    k = size / SIZE
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    cell = SIZE // 3  # lengths below are in the 96-pixel layout, scaled by k when drawn
    for c, s, p in scene.objects:
        i = PLACES.index(p)
        cx, cy = (i % 3) * cell + cell // 2 + rng.randint(-2, 2), (i // 3) * cell + cell // 2 + rng.randint(-2, 2)
        cx, cy, r = round(cx * k), round(cy * k), round(rng.randint(10, 13) * k)
        box = (cx - r, cy - r, cx + r, cy + r)
        if s == "circle":
            d.ellipse(box, fill=COLORS[c])
        elif s == "square":
            d.rectangle(box, fill=COLORS[c])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[c])
    if scene.word:
        i = PLACES.index(scene.word_place)
        font = ImageFont.load_default(size=round(14 * k))
        d.text((round(((i % 3) * cell + 3) * k), round(((i // 3) * cell + 8) * k)), scene.word, fill=(0, 0, 0), font=font)
    return img


def fact_checks(answer: str, scene: Scene) -> dict[str, list[int]]:
    """Per kind of fact ("count", "object", "place", "word"): [stated correctly, in the scene]. An object
    counts when "<colour> <shape>" appears; its place when the phrase that follows it names the right
    place; the count when "<n> shape" appears."""
    a = answer.lower()
    out = {"count": [0, 1], "object": [0, 0], "place": [0, 0], "word": [0, 0]}
    n = len(scene.objects)
    if re.search(rf"\b{NUMBERS[n]} shapes?\b", a):
        out["count"][0] = 1
    for c, s, p in scene.objects:
        out["object"][1] += 1
        out["place"][1] += 1
        m = re.search(rf"\b{c} {s}\b(.{{0,30}})", a)
        if m:
            out["object"][0] += 1
            # "at the top" must not be read into "at the top left"
            if re.match(rf"\s*{re.escape(_at(p))}(?! (left|right))\b", m.group(1)):
                out["place"][0] += 1
    if scene.word:
        out["word"] = [int(bool(re.search(rf'word "?{scene.word}"?', a))), 1]
    return out


def score(answer: str, scene: Scene) -> tuple[int, int]:
    """(facts stated correctly, facts in the scene): :func:`fact_checks` summed."""
    return sum(g for g, _ in fact_checks(answer, scene).values()), len(scene.facts())
