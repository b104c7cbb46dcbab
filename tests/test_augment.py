"""adc_jax.augment: shapes, determinism, the paper's transform order, and parity with PIL."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adc_jax import augment

MEAN = {3: (0.485, 0.456, 0.406), 1: (0.5,)}
STD = {3: (0.229, 0.224, 0.225), 1: (0.25,)}
SIZE = 40
B = 6


def smooth_images(b: int, c: int, seed: int = 0, h: int = 32, w: int = 32) -> np.ndarray:
    """uint8 [b, h, w, c] random walks along rows: image-like statistics, not white noise."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.integers(-20, 21, (b, h, w, c)), axis=2) // 2 + 128
    return np.clip(walk, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def train_fn():
    """Full training transform, jitted once per channel count."""
    fns = {
        c: jax.jit(
            functools.partial(augment.train_augment, image_size=SIZE, mean=MEAN[c], std=STD[c])
        )
        for c in (1, 3)
    }
    return lambda images, key: fns[images.shape[-1]](images, key)


def denormalise(x: jax.Array, c: int) -> np.ndarray:
    return np.asarray(x) * np.asarray(STD[c]) + np.asarray(MEAN[c])


@pytest.mark.parametrize("c", [1, 3])
def test_train_augment_shape_dtype_range(train_fn, c):
    out = train_fn(jnp.asarray(smooth_images(B, c)), jax.random.key(0))
    assert out.shape == (B, SIZE, SIZE, c) and out.dtype == jnp.float32
    pixels = denormalise(out, c)
    assert np.isfinite(pixels).all()
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("c", [1, 3])
def test_deterministic_per_key_and_per_image(train_fn, c):
    images = jnp.asarray(smooth_images(B, c))
    a = train_fn(images, jax.random.key(1))
    np.testing.assert_array_equal(a, train_fn(images, jax.random.key(1)))
    assert not np.allclose(a, train_fn(images, jax.random.key(2)))
    # Every image draws its own ops: copies of one image come out different.
    same = jnp.broadcast_to(images[:1], images.shape)
    out = np.asarray(train_fn(same, jax.random.key(3)))
    assert len({out[i].tobytes() for i in range(B)}) > B // 2


def test_constant_images_stay_finite(train_fn):
    for c in (1, 3):
        for value in (0, 128, 255):
            images = jnp.full((B, 32, 32, c), value, jnp.uint8)
            for seed in range(3):
                assert np.isfinite(np.asarray(train_fn(images, jax.random.key(seed)))).all()
    for value in (0.0, 128 / 255, 1.0):  # levels of the 8-bit grid
        flat = jnp.full((8, 8, 3), value)
        np.testing.assert_array_equal(augment.equalize(flat), flat)
        np.testing.assert_array_equal(augment.autocontrast(flat), flat)


@pytest.mark.parametrize("c", [1, 3])
def test_eval_preprocess_is_resize_then_normalise(c):
    images = jnp.asarray(smooth_images(2, c, h=28, w=28))
    out = augment.eval_preprocess(images, image_size=SIZE, mean=MEAN[c], std=STD[c])
    resized = jax.image.resize(images / 255.0, (2, SIZE, SIZE, c), method="bilinear")
    expected = (resized - jnp.asarray(MEAN[c])) / jnp.asarray(STD[c])
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == jnp.float32
    # Same size: no resampling at all.
    same = augment.eval_preprocess(images, image_size=28, mean=MEAN[c], std=STD[c])
    np.testing.assert_array_equal(
        same, (images / 255.0 - jnp.asarray(MEAN[c])) / jnp.asarray(STD[c])
    )


def test_to_rgb_and_statistics_mismatch():
    grey = jnp.asarray(smooth_images(2, 1))
    rgb = augment.eval_preprocess(grey, image_size=32, mean=MEAN[3], std=STD[3], to_rgb=True)
    assert rgb.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(rgb[..., 0] * STD[3][0] + MEAN[3][0], grey[..., 0] / 255, atol=1e-6)
    with pytest.raises(ValueError, match="to_rgb=True"):
        augment.eval_preprocess(grey, image_size=32, mean=MEAN[3], std=STD[3])


def test_flip_really_flips():
    images = jnp.asarray(smooth_images(16, 3))
    fn = jax.jit(
        functools.partial(
            augment.train_augment,
            image_size=SIZE,
            mean=MEAN[3],
            std=STD[3],
            randaugment=False,
            color_jitter=(0.0, 0.0, 0.0, 0.0),
        )
    )
    out = np.asarray(fn(images, jax.random.key(0)))
    plain = np.asarray(augment.eval_preprocess(images, image_size=SIZE, mean=MEAN[3], std=STD[3]))
    flipped = plain[:, :, ::-1]
    is_plain = [np.array_equal(o, p) for o, p in zip(out, plain, strict=True)]
    is_flipped = [np.array_equal(o, f) for o, f in zip(out, flipped, strict=True)]
    assert all(p != f for p, f in zip(is_plain, is_flipped, strict=True))  # exactly one holds
    assert 0 < sum(is_flipped) < 16


@pytest.mark.slow
def test_vmap_over_steps_matches_separate_calls(train_fn):
    images = jnp.asarray(smooth_images(2 * B, 3)).reshape(2, B, 32, 32, 3)
    keys = jax.random.split(jax.random.key(4), 2)
    fn = functools.partial(augment.train_augment, image_size=SIZE, mean=MEAN[3], std=STD[3])
    batched = jax.jit(jax.vmap(fn))(images, keys)
    for i in range(2):  # train_fn is the same transform, already compiled for [B, 32, 32, 3]
        np.testing.assert_allclose(batched[i], train_fn(images[i], keys[i]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The ops themselves
# ---------------------------------------------------------------------------------------------


def test_magnitudes_are_torchvisions():
    m = augment._magnitudes(9, 31, 32, 32)
    assert m["shear"] == pytest.approx(0.09) and m["enhance"] == pytest.approx(0.27)
    assert m["translate_x"] == 4.0  # int(150 / 331 · 32 · 0.3) = int(4.35)
    assert m["rotate"] == pytest.approx(math.radians(9.0))
    assert m["posterize"] == 7 and m["solarize"] == pytest.approx(178.5)
    top = augment._magnitudes(30, 31, 28, 28)
    assert (top["posterize"], top["solarize"], top["translate_y"]) == (4, 0.0, 12.0)
    with pytest.raises(ValueError, match="magnitude"):
        augment._magnitudes(31, 31, 32, 32)


def test_colour_ops_leave_grey_images_alone():
    grey = jnp.asarray(smooth_images(1, 1)[0]) / 255.0
    np.testing.assert_array_equal(augment.adjust_saturation(grey, 0.3), grey)
    np.testing.assert_array_equal(augment.adjust_hue(grey, 0.2), grey)


def test_color_jitter_factors_stay_in_range():
    grey_rgb = jnp.full((64, 4, 4, 3), 100 / 255.0)
    out = jax.jit(functools.partial(augment.jitter_colors, contrast=0.0, saturation=0.0, hue=0.0))(
        grey_rgb, jax.random.key(0)
    )
    ratio = np.asarray(out[:, 0, 0, 0]) * 255 / 100
    assert ratio.min() >= 0.6 - 0.01 and ratio.max() <= 1.4 + 0.01
    assert ratio.max() - ratio.min() > 0.4  # factors really vary per image


# PIL is what the paper's torchvision pipeline ran on (transforms on PIL images), so it is the
# reference; geometric ops go through torchvision's inverse affine matrix, copied below.


def _torchvision_inverse_affine(center, angle, translate, shear):
    """torchvision.transforms.functional._get_inverse_affine_matrix with scale 1."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    return [m[0], m[1], m[2] + cx, m[3], m[4], m[5] + cy]


@pytest.mark.slow
@pytest.mark.parametrize("c", [1, 3])
def test_ops_match_pil(c):
    pil = pytest.importorskip("PIL")
    from PIL import Image, ImageEnhance, ImageOps

    del pil
    array = smooth_images(1, c, seed=5)[0]
    array = (array // 2 + 40).astype(np.uint8)  # a narrow range, so autocontrast stretches
    img = Image.fromarray(array[..., 0] if c == 1 else array)
    x = jnp.asarray(array, jnp.float32) / 255.0

    def ours(fn, *args):
        return np.round(np.asarray(fn(x, *args)) * 255).astype(int)

    def theirs(pil_img):
        return np.asarray(pil_img).astype(int).reshape(array.shape)

    cases = {
        "posterize": (ours(augment.posterize, 7), ImageOps.posterize(img, 7)),
        "solarize": (ours(augment.solarize, 178.5), ImageOps.solarize(img, 178.5)),
        "equalize": (ours(augment.equalize), ImageOps.equalize(img)),
    }
    for f in (0.73, 1.27):
        cases[f"brightness {f}"] = (
            ours(augment.adjust_brightness, f),
            ImageEnhance.Brightness(img).enhance(f),
        )
        cases[f"contrast {f}"] = (
            ours(augment.adjust_contrast, f),
            ImageEnhance.Contrast(img).enhance(f),
        )
        cases[f"sharpness {f}"] = (
            ours(augment.adjust_sharpness, f),
            ImageEnhance.Sharpness(img).enhance(f),
        )
    mag = augment._magnitudes(9, 31, 32, 32)
    for sign in (1, -1):
        shear = math.degrees(math.atan(sign * mag["shear"]))
        t = int(sign * 150 / 331 * 32 * 0.3)
        matrices = {  # RandAugment's calls of F.affine / F.rotate (which negates the angle)
            1: _torchvision_inverse_affine([0, 0], 0.0, [0, 0], [shear, 0.0]),
            2: _torchvision_inverse_affine([0, 0], 0.0, [0, 0], [0.0, shear]),
            3: _torchvision_inverse_affine([16, 16], 0.0, [t, 0], [0.0, 0.0]),
            4: _torchvision_inverse_affine([16, 16], 0.0, [0, t], [0.0, 0.0]),
            5: _torchvision_inverse_affine([16, 16], -sign * 9.0, [0, 0], [0.0, 0.0]),
        }
        for op, matrix in matrices.items():
            inverse = augment._geometric_inverse(jnp.int32(op), jnp.float32(sign), mag, 32, 32)
            expected = img.transform((32, 32), Image.AFFINE, matrix, Image.NEAREST, fillcolor=0)
            cases[f"{augment.RANDAUGMENT_OPS[op]} {sign:+d}"] = (
                ours(lambda im, inv=inverse: augment._affine(im, inv)),
                expected,
            )
    for name, (got, want) in cases.items():
        np.testing.assert_array_equal(got, theirs(want), err_msg=name)
    # One level off on a few pixels: PIL's autocontrast computes its table as
    # int(v·s − lo·s) in float64, so levels that are exact integers can land a hair below and
    # truncate one lower; Color's luma weights differ from PIL's in the 4th decimal.
    near = {"autocontrast": (ours(augment.autocontrast), ImageOps.autocontrast(img))}
    if c == 3:
        for f in (0.73, 1.27):
            near[f"color {f}"] = (
                ours(augment.adjust_saturation, f),
                ImageEnhance.Color(img).enhance(f),
            )
    for name, (got, want) in near.items():
        diff = np.abs(got - theirs(want))
        assert diff.max() <= 1 and np.mean(diff) < 0.05, name
