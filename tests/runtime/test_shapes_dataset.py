"""The shapes dataset: caption grammar round trip, held-out split, deterministic rendering."""
import itertools

import numpy as np
import pytest

from runtime.models.errors import InputError
from runtime.shapes import dataset as D


def test_caption_parse_round_trip_for_every_combination():
    for s, c, b in D.all_triples():
        for p, z in itertools.product(D.POSITIONS, D.SIZES):
            a = D.Attributes(s, c, b, p, z)
            assert D.parse_caption(D.caption(a)) == a
        short = D.Attributes(s, c, b)
        assert D.parse_caption(D.caption(short)) == short
        assert D.parse_caption(D.caption(D.Attributes(s, c, b, "left", "small"), short=True)) == short


def test_caption_wording_and_tolerated_variants():
    a = D.Attributes("circle", "red", "blue", "left", "large")
    assert D.caption(a) == "a large red circle on a blue background, on the left"
    centre = D.Attributes("square", "white", "black", "centre", "small")
    assert D.caption(centre) == "a small white square on a black background, in the centre"
    for text in ("A small white square on a black background in the center.",
                 "a small white square on a black background, in the middle",
                 "  a small  white square on a black background , in the centre"):
        assert D.parse_caption(text) == centre


@pytest.mark.parametrize("text", ["a red circle", "a huge red circle on a blue background",
                                  "a red hexagon on a blue background",
                                  "a red circle on a teal background",
                                  "a red circle on a blue background, on the diagonal"])
def test_parse_rejects_what_the_grammar_does_not_produce(text):
    with pytest.raises(InputError):
        D.parse_caption(text)


def test_held_out_split_is_disjoint_stable_and_about_ten_percent():
    train = D.training_combinations()
    held = D.held_out_combinations()
    assert not {a.triple() for a in train} & {a.triple() for a in held}
    assert len(train) + len(held) == len(D.all_triples()) * len(D.POSITIONS) * len(D.SIZES)
    assert 0.08 <= len(D.HELD_OUT_TRIPLES) / len(D.all_triples()) <= 0.12
    assert D._held_out_triples(D.HELD_OUT_SEED) == D.HELD_OUT_TRIPLES  # same seed, same set
    assert D._held_out_triples(D.HELD_OUT_SEED + 1) != D.HELD_OUT_TRIPLES
    assert all(D.is_held_out(a) for a in held) and not any(D.is_held_out(a) for a in train)
    # Every pair of attributes a held-out triple combines is still seen in training.
    seen = {p for a in train for p in D._pairs(a.triple())}
    assert all(p in seen for t in D.HELD_OUT_TRIPLES for p in D._pairs(t))
    prompts = D.held_out_prompts(40)
    assert prompts == D.held_out_prompts(40) and len(set(prompts)) == 40
    assert all(D.is_held_out(D.parse_caption(p)) for p in prompts)


def test_sampling_respects_the_split():
    _, captions, attrs = D.sample(200, seed=3)
    assert not any(D.is_held_out(a) for a in attrs)
    assert [D.caption(a) for a in attrs] == captions
    _, _, held = D.sample(50, seed=3, split="held_out")
    assert all(D.is_held_out(a) for a in held)


def test_render_is_deterministic_given_the_seed():
    x1, c1, _ = D.sample(16, seed=11)
    x2, c2, _ = D.sample(16, seed=11)
    x3, _, _ = D.sample(16, seed=12)
    assert np.array_equal(x1, x2) and c1 == c2
    assert not np.array_equal(x1, x3)
    a = D.Attributes("triangle", "yellow", "blue", "top", "large")
    assert np.array_equal(D.render(a, rng=np.random.default_rng(5)), D.render(a, rng=np.random.default_rng(5)))


def test_render_draws_flat_colours_where_the_attributes_say():
    a = D.Attributes("square", "red", "cyan", "right", "large")
    img = D.render(a)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    cx, cy = (int(v * 64) for v in D.POSITION_CENTRES["right"])
    assert tuple(img[cy, cx]) == D.PALETTE["red"]
    assert tuple(img[0, 0]) == tuple(img[63, 5]) == D.PALETTE["cyan"]
    side = (np.all(img == D.PALETTE["red"], axis=-1)).any(axis=0).sum()  # columns holding red
    assert abs(side - D.SIZE_EXTENTS["large"] * 64) <= 1.5
    assert D.render(a, size=128).shape == (128, 128, 3)


def test_render_rejects_incomplete_attributes():
    with pytest.raises(InputError):
        D.render(D.Attributes("circle", "red", "blue"))
