"""The shapes scorer reads the dataset's own images back, also blurred, noisy and colour-shifted."""
import numpy as np
import pytest

from runtime.models.errors import InputError
from runtime.shapes import dataset as D
from runtime.shapes import scorer as S


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) image, edges replicated (the reference degradation)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    f = img.astype(np.float32)
    p = np.pad(f, ((r, r), (0, 0), (0, 0)), mode="edge")
    f = sum(k[i] * p[i:i + img.shape[0]] for i in range(2 * r + 1))
    p = np.pad(f, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * r + 1))


def _degrade(img, rng, sigma, noise, drift):
    """Blur, per-pixel Gaussian noise, and one colour shift per image (a small generator's errors)."""
    f = _blur(img, sigma) + rng.normal(0, noise, img.shape) + rng.uniform(-drift, drift, 3)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _rates(images, attrs):
    hits = {k: 0 for k in S.ATTRIBUTES}
    for img, a in zip(images, attrs):
        read = S.read_attributes(img)
        for k in S.ATTRIBUTES:
            hits[k] += getattr(read, k) == getattr(a, k)
    return {k: v / len(images) for k, v in hits.items()}


def test_reads_clean_dataset_images(record_property):
    images, _, attrs = D.sample(2000, seed=101)
    rates = _rates(images, attrs)
    record_property("clean_rates", rates)
    print("clean", rates)
    assert all(r >= 0.99 for r in rates.values()), rates


def test_reads_held_out_images():
    images, _, attrs = D.sample(300, seed=102, split="held_out")
    rates = _rates(images, attrs)
    assert all(r >= 0.99 for r in rates.values()), rates


def test_reads_blurred_noisy_colour_shifted_images(record_property):
    images, _, attrs = D.sample(1000, seed=103)
    rng = np.random.default_rng(0)
    degraded = [_degrade(x, rng, sigma=1.0, noise=12.0, drift=40.0) for x in images]
    rates = _rates(degraded, attrs)
    record_property("degraded_rates", rates)
    print("degraded", rates)
    assert all(r >= 0.95 for r in rates.values()), rates


def test_accepts_pil_float_and_larger_images():
    a = D.Attributes("triangle", "green", "magenta", "bottom", "large")
    img = D.render(a, size=96, rng=np.random.default_rng(1))
    assert S.read_attributes(img) == a
    assert S.read_attributes(D.to_pil(img)) == a
    assert S.read_attributes(img.astype(np.float32) / 255.0) == a


def test_blank_image_reads_background_only():
    blank = np.zeros((64, 64, 3), np.uint8)
    blank[...] = D.PALETTE["blue"]
    assert S.read_attributes(blank) == D.Attributes(None, None, "blue", None, None)
    result = S.score(blank, "a large red circle on a blue background, on the left")
    assert result["background"] and not result["shape"] and not result["colour"]
    assert result["overall"] == pytest.approx(1 / 5)


def test_score_against_prompt():
    a = D.Attributes("circle", "yellow", "black", "left", "small")
    img = D.render(a)
    assert S.score(img, D.caption(a)) == {k: True for k in S.ATTRIBUTES} | {"overall": 1.0}
    wrong = S.score(img, "a large yellow square on a black background, on the right")
    assert wrong == {"shape": False, "colour": True, "background": True, "position": False,
                     "size": False, "overall": pytest.approx(2 / 5)}
    short = S.score(img, "a yellow circle on a black background")  # only what the prompt names
    assert set(short) == {"shape", "colour", "background", "overall"} and short["overall"] == 1.0
    rates = S.adherence([img, img], [D.caption(a), "a yellow circle on a white background"])
    assert rates["background"] == 0.5 and rates["shape"] == 1.0


def test_bad_images_are_rejected():
    with pytest.raises(InputError, match="too small"):
        S.read_attributes(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="shape"):
        S.read_attributes(np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError):
        S.adherence([np.zeros((64, 64, 3), np.uint8)], [])
