import random

from vispec.demo.scenes import PLACES, SIZE, make_scene, score


def test_scenes_are_reproducible_and_described_fully():
    a, b = make_scene(random.Random(7)), make_scene(random.Random(7))
    assert a.description() == b.description() and a.image.tobytes() == b.image.tobytes()
    for seed in range(50):
        s = make_scene(random.Random(seed))
        assert s.image.size == (SIZE, SIZE)
        assert 1 <= len(s.objects) <= 3 and len({(c, k) for c, k, _ in s.objects}) == len(s.objects)
        assert len({p for *_, p in s.objects} | ({s.word_place} if s.word else set())) == len(s.objects) + bool(s.word)
        good, total = score(s.description(), s)
        assert good == total  # the reference description states every fact


def test_score_counts_only_right_facts():
    s = make_scene(random.Random(1))
    c, k, p = s.objects[0]
    other = next(q for q in PLACES if q != p and not q.startswith(p) and not p.startswith(q))
    wrong = f"The image shows a {c} {k} at the {other}."
    good, total = score(wrong, s)
    assert good == 1 and total == len(s.facts())  # the object, not its place, not the count
    assert score("nothing here", s)[0] == 0
    # "at the top" is not "at the top left"
    from vispec.demo.scenes import Scene

    t = Scene([("red", "circle", "top")])
    assert score("one shape: a red circle at the top left", t) == (2, 3)
    assert score("one shape: a red circle at the top.", t) == (3, 3)


def test_scenes_drawn_at_any_size_show_the_same_content():
    """A seed is one picture at every size: the 336-pixel drawing shrunk to 96 pixels is the 96-pixel one up to
    anti-aliasing, and each shape's colour sits at its scaled centre."""
    import numpy as np
    import pytest
    from PIL import Image

    from vispec.demo.scenes import COLORS

    for seed in range(6):
        small, big = make_scene(random.Random(seed)), make_scene(random.Random(seed), size=336)
        assert big.description() == small.description() and big.image.size == (336, 336)
        shrunk = np.asarray(big.image.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32)
        diff = np.abs(shrunk - np.asarray(small.image, dtype=np.float32)).mean()
        assert diff < 12, diff  # a different layout would differ by far more (whole shapes misplaced)
        for c, _, p in big.objects:
            i = PLACES.index(p)
            x, y = round(((i % 3) * 32 + 16) * 3.5), round(((i // 3) * 32 + 16) * 3.5)  # centre, up to the jitter
            assert tuple(big.image.getpixel((x, y))) == COLORS[c]
    with pytest.raises(ValueError, match="96 pixels or more"):
        make_scene(random.Random(0), size=48)
