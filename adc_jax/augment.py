"""On-device augmentation under ``jit``: the paper's training transform and the test transform.

The host ships uint8 images at their stored size (CIFAR: 32×32) and the device augments them from a
per-step key (docs/design.md). :func:`train_augment` follows the paper's torchvision
pipeline (docs/paper_protocol.md), in its order:

1. RandAugment (torchvision semantics): ``num_ops`` ops per image, each drawn uniformly from
   Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast,
   Sharpness, Posterize, Solarize, AutoContrast, Equalize; one magnitude bin (default 9) of 31;
   the signed ops (shears, translations, rotation, the four enhancements) take a random sign;
   nearest-neighbour resampling with black fill, as torchvision's defaults.
2. ColorJitter (torchvision semantics): brightness / contrast / saturation factors drawn from
   ``[max(0, 1 - x), 1 + x]``, hue shift from ``[-h, h]``, applied in a random order per image.
3. Resize to ``image_size`` × ``image_size``: ``jax.image.resize`` bilinear with half-pixel
   centres. Its antialiasing (on) only acts when shrinking; torchvision's ``Resize`` on PIL
   images, what the paper's code ran, is PIL bilinear, also antialiased when shrinking, so
   upsampling CIFAR's 32 px to 224 px matches it up to rounding.
4. Random horizontal flip (p = 0.5).
5. ``(x / 255 - mean) / std``.

Steps 1–2 run at the stored resolution, before the resize, where they are cheap. Every image
draws its own ops, magnitudes' signs, jitter factors and flip. Images go through steps 1–2 as
float32 in [0, 1] kept on the 8-bit grid after every op, as the PIL images the paper's torchvision
pipeline worked on: truncating where PIL truncates (blends, autocontrast), rounding where it rounds
(greyscale, the sharpness filter). Posterize, solarize and equalize depend on it. Checked against
PIL on random images: every op is pixel-exact except Color, where one pixel in a few hundred is
one level off (luma weights), and the geometric ops equal torchvision's affine on PIL images
(nearest, same centres and signs).

Where torchvision and dm-pix disagree we follow torchvision (the paper's library): dm-pix's
``adjust_brightness`` is additive and its contrast / saturation follow TensorFlow (per-channel mean,
HSV saturation), while torchvision multiplies and blends with a grey image. dm-pix does the
affine resampling, the hue shift, solarize, greyscale and the flip. Colour-only ops (Color /
saturation, hue) leave 1-channel images unchanged, as torchvision does.

All shapes are static; everything is jit-able and vmap-friendly, and the output is a deterministic
function of the key. The keyword arguments are static: jit with them bound, e.g.
``jax.jit(functools.partial(train_augment, image_size=224, mean=MEAN, std=STD))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp

NUM_MAGNITUDE_BINS = 31

RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_NUM_GEOMETRIC = 6  # Identity and the five affine ops come first in RANDAUGMENT_OPS


def _round8(image: jax.Array) -> jax.Array:
    """Clips to [0, 1] and rounds to the 8-bit grid."""
    return jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0) / 255.0


def _trunc8(image: jax.Array) -> jax.Array:
    """Clips to [0, 1] and truncates to the 8-bit grid, as PIL and torchvision's uint8 casts do.

    The 1e-3 (of a level) absorbs float error of values that are exact levels, e.g. 0.5 · 2 · x.
    """
    return jnp.floor(jnp.clip(image, 0.0, 1.0) * 255.0 + 1e-3) / 255.0


def _blend(image: jax.Array, degenerate: jax.Array, factor: jax.Array) -> jax.Array:
    # torchvision's _blend / PIL's Image.blend: factor·image + (1 − factor)·degenerate.
    return _trunc8(factor * image + (1.0 - factor) * degenerate)


def _grey(image: jax.Array) -> jax.Array:
    """Luma (ITU-R 601) of an RGB image on the 8-bit grid, ``[h, w, 1]``; 1 channel as is.

    Rounded like PIL's ``convert("L")``; its weights (0.299, 0.587, 0.114) differ from dm-pix's
    and torchvision's (0.2989, ...) by so little that one pixel in a few hundred moves by a level.
    """
    if image.shape[-1] == 1:
        return image
    return _round8(pix.rgb_to_grayscale(image))


# ---------------------------------------------------------------------------------------------
# Single-image ops: float32 [h, w, C] in [0, 1] -> same
# ---------------------------------------------------------------------------------------------


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_brightness``: ``factor · image`` (blend with black)."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_contrast``: blend with the mean grey level of the whole image.

    The mean is rounded to a level, as PIL's ``ImageEnhance.Contrast`` does.
    """
    return _blend(image, _round8(jnp.mean(_grey(image))), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_saturation``: blend with the greyscale image; 1 channel unchanged."""
    if image.shape[-1] == 1:
        return image
    return _blend(image, _grey(image), factor)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
    """Hue rotation by ``delta`` turns (dm-pix, HSV); 1 channel unchanged."""
    if image.shape[-1] == 1:
        return image
    return jnp.clip(pix.adjust_hue(image, delta), 0.0, 1.0)


def adjust_sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``adjust_sharpness``: blend with a 3×3 smoothed copy whose border is the image.

    The smoothing kernel is ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` (PIL's SMOOTH filter), its
    result rounded to 8 bits; ``factor`` > 1 sharpens, < 1 blurs.
    """
    h, w, _ = image.shape
    if h < 3 or w < 3:
        return image
    kernel = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
    inner = sum(
        kernel[di][dj] * image[di : h - 2 + di, dj : w - 2 + dj]
        for di in range(3)
        for dj in range(3)
    )
    inner = _round8(inner / 13.0)
    degenerate = image.at[1:-1, 1:-1].set(inner)
    return _blend(image, degenerate, factor)


def posterize(image: jax.Array, bits: int) -> jax.Array:
    """Keeps the ``bits`` most significant bits of every 8-bit value."""
    step = float(2 ** (8 - bits))
    return jnp.floor(jnp.round(image * 255.0) / step) * step / 255.0


def solarize(image: jax.Array, threshold: float) -> jax.Array:
    """Inverts values ``>= threshold`` (threshold in 0–255 units, as torchvision's)."""
    return pix.solarize(image, threshold / 255.0)


def autocontrast(image: jax.Array) -> jax.Array:
    """torchvision ``autocontrast``: stretch each channel to [0, 1]; constant channels as is."""
    lo = jnp.min(image, axis=(0, 1), keepdims=True)
    hi = jnp.max(image, axis=(0, 1), keepdims=True)
    flat = hi <= lo
    # A constant channel has no range to stretch: keep it (torchvision sets scale 1, min 0).
    scale = 1.0 / jnp.where(flat, 1.0, hi - lo)
    lo = jnp.where(flat, 0.0, lo)
    return _trunc8((image - lo) * scale)


def _equalize_channel(values: jax.Array) -> jax.Array:
    """torchvision's per-channel histogram equalisation of int32 values in [0, 255]."""
    hist = jnp.bincount(values.ravel(), length=256)
    # torchvision: step = (count of all pixels except those of the highest value present) // 255.
    top = hist[jnp.max(values)]
    step = (values.size - top) // 255
    safe = jnp.maximum(step, 1)
    lut = (jnp.cumsum(hist) + safe // 2) // safe
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
    # step == 0 (nearly constant channel): torchvision leaves the channel unchanged.
    return jnp.where(step == 0, values, lut[values])


def equalize(image: jax.Array) -> jax.Array:
    """torchvision ``equalize``: histogram equalisation per channel on the 8-bit values."""
    values = jnp.round(image * 255.0).astype(jnp.int32)
    out = jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(values)
    return out.astype(jnp.float32) / 255.0


def _affine(image: jax.Array, inverse: jax.Array) -> jax.Array:
    """Resamples ``image`` at ``inverse @ [row, col, 1]`` (nearest, black outside).

    ``inverse`` is ``[2, 3]`` in (row, col) pixel-index coordinates.
    """
    matrix = jnp.eye(4, dtype=image.dtype)
    matrix = matrix.at[:2, :2].set(inverse[:, :2]).at[:2, 3].set(inverse[:, 2])
    return pix.affine_transform(image, matrix, order=0, mode="constant", cval=0.0)


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------


def _magnitudes(magnitude: int, num_bins: int, height: int, width: int) -> dict[str, float]:
    """Values of torchvision's ``_augmentation_space`` at bin ``magnitude`` (unsigned)."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in [0, {num_bins}), got {magnitude}.")
    frac = magnitude / (num_bins - 1) if num_bins > 1 else 0.0
    return {
        "shear": 0.3 * frac,
        # torchvision passes int(magnitude) pixels: truncation toward zero, before the sign.
        "translate_x": float(int(150.0 / 331.0 * width * frac)),
        "translate_y": float(int(150.0 / 331.0 * height * frac)),
        "rotate": math.radians(30.0 * frac),
        "enhance": 0.9 * frac,
        # 8 − round(bin / ((bins − 1) / 4)); Python's round is half-to-even like torch.round.
        "posterize": int(8 - round(magnitude / ((num_bins - 1) / 4))) if num_bins > 1 else 8,
        "solarize": 255.0 * (1.0 - frac),
    }


def _geometric_inverse(op: jax.Array, sign: jax.Array, mag: dict, height: int, width: int):
    """Inverse affine map ``[2, 3]`` (row, col) of op ``op`` (identity for non-geometric ops).

    The maps RandAugment passes to torchvision's ``affine`` / ``rotate``, on the pixel-centre
    grid: the shears turn about the top-left corner (``center=[0, 0]``), the rotation about the
    image centre, counter-clockwise for a positive angle (pixel-exact against torchvision's PIL
    path; see tests/test_augment.py).
    """
    s = jnp.asarray(sign, jnp.float32)
    m = s * mag["shear"]
    tx = s * mag["translate_x"]
    ty = s * mag["translate_y"]
    theta = s * mag["rotate"]
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    ci, cj = (height - 1) / 2.0, (width - 1) / 2.0
    one, zero = jnp.ones(()), jnp.zeros(())
    mats = jnp.stack(
        [
            jnp.array([[one, zero, zero], [zero, one, zero]]),  # Identity
            jnp.array([[one, zero, zero], [m, one, 0.5 * m]]),  # ShearX: col += m·(row + ½)
            jnp.array([[one, m, 0.5 * m], [zero, one, zero]]),  # ShearY: row += m·(col + ½)
            jnp.array([[one, zero, zero], [zero, one, -tx]]),  # TranslateX
            jnp.array([[one, zero, -ty], [zero, one, zero]]),  # TranslateY
            jnp.array(  # Rotate about the centre
                [
                    [cos, sin, ci - cos * ci - sin * cj],
                    [-sin, cos, cj + sin * ci - cos * cj],
                ]
            ),
        ]
    )
    return mats[jnp.where(op < _NUM_GEOMETRIC, op, 0)]


def _rand_augment_one(
    image: jax.Array, key: jax.Array, *, num_ops: int, magnitude: int, num_bins: int
) -> jax.Array:
    h, w, _ = image.shape
    mag = _magnitudes(magnitude, num_bins, h, w)
    enhance = mag["enhance"]

    def keep(x, sign):
        return x

    # Colour branches, indexed by op; the geometric ops were applied before the switch.
    colour: list[Callable[[jax.Array, jax.Array], jax.Array]] = [keep] * _NUM_GEOMETRIC + [
        lambda x, s: adjust_brightness(x, 1.0 + s * enhance),
        lambda x, s: adjust_saturation(x, 1.0 + s * enhance),
        lambda x, s: adjust_contrast(x, 1.0 + s * enhance),
        lambda x, s: adjust_sharpness(x, 1.0 + s * enhance),
        lambda x, s: posterize(x, mag["posterize"]),
        lambda x, s: solarize(x, mag["solarize"]),
        lambda x, s: autocontrast(x),
        lambda x, s: equalize(x),
    ]
    assert len(colour) == len(RANDAUGMENT_OPS)
    for op_key in jax.random.split(key, num_ops):
        k_op, k_sign = jax.random.split(op_key)
        op = jax.random.randint(k_op, (), 0, len(RANDAUGMENT_OPS))
        sign = jnp.where(jax.random.bernoulli(k_sign), -1.0, 1.0)
        # One resampling per op: non-geometric ops resample with the identity map, which is
        # exact (integer coordinates, nearest), so one gather serves all six geometric choices.
        image = _affine(image, _geometric_inverse(op, sign, mag, h, w))
        image = _round8(jax.lax.switch(op, colour, image, sign))
    return image


def rand_augment(
    images: jax.Array,
    key: jax.Array,
    *,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = NUM_MAGNITUDE_BINS,
) -> jax.Array:
    """torchvision ``RandAugment`` on a batch, each image drawing its own ops and signs.

    Args:
      images: float32 ``[B, h, w, C]`` in [0, 1] on the 8-bit grid, C = 1 or 3.
      key: PRNG key.
      num_ops: ops applied in sequence to each image.
      magnitude: magnitude bin in ``[0, num_magnitude_bins)``.
      num_magnitude_bins: 31 in torchvision.

    Returns:
      float32 ``[B, h, w, C]`` in [0, 1] on the 8-bit grid.
    """
    keys = jax.random.split(key, images.shape[0])
    fn = lambda x, k: _rand_augment_one(
        x, k, num_ops=num_ops, magnitude=magnitude, num_bins=num_magnitude_bins
    )
    return jax.vmap(fn)(images, keys)


# ---------------------------------------------------------------------------------------------
# ColorJitter
# ---------------------------------------------------------------------------------------------


def _color_jitter_one(image: jax.Array, key: jax.Array, jitter: Sequence[float]) -> jax.Array:
    brightness, contrast, saturation, hue = jitter
    ops: list[tuple[Callable, float, float]] = []  # (op, low, high) of the enabled ops
    if brightness > 0:
        ops.append((adjust_brightness, max(0.0, 1.0 - brightness), 1.0 + brightness))
    if contrast > 0:
        ops.append((adjust_contrast, max(0.0, 1.0 - contrast), 1.0 + contrast))
    if saturation > 0:
        ops.append((adjust_saturation, max(0.0, 1.0 - saturation), 1.0 + saturation))
    if hue > 0:
        ops.append((adjust_hue, -hue, hue))
    if not ops:
        return image
    k_order, k_factors = jax.random.split(key)
    lows = jnp.array([lo for _, lo, _ in ops])
    highs = jnp.array([hi for _, _, hi in ops])
    factors = jax.random.uniform(k_factors, (len(ops),), minval=lows, maxval=highs)
    order = jax.random.permutation(k_order, len(ops))
    branches = [lambda x, f, op=op: op(x, f) for op, _, _ in ops]
    for position in range(len(ops)):
        i = order[position]
        image = _round8(jax.lax.switch(i, branches, image, factors[i]))
    return image


def jitter_colors(
    images: jax.Array,
    key: jax.Array,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.0,
) -> jax.Array:
    """torchvision ``ColorJitter`` on a batch: per-image factors and a random op order.

    Args:
      images: float32 ``[B, h, w, C]`` in [0, 1], C = 1 or 3.
      key: PRNG key.
      brightness, contrast, saturation: factor drawn from ``[max(0, 1 − x), 1 + x]``; 0 skips.
      hue: shift drawn from ``[−hue, hue]`` turns, ``hue <= 0.5``; 0 skips.

    Returns:
      float32 ``[B, h, w, C]`` in [0, 1] on the 8-bit grid.
    """
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}.")
    jitter = (brightness, contrast, saturation, hue)
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda x, k: _color_jitter_one(x, k, jitter))(images, keys)


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def _check_images(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, h, w, C] with C = 1 or 3, got {images.shape}.")


def _resize(images: jax.Array, image_size: int) -> jax.Array:
    b, h, w, c = images.shape
    if (h, w) == (image_size, image_size):
        return images
    return jax.image.resize(images, (b, image_size, image_size, c), method="bilinear")


def _normalize(
    images: jax.Array, mean: Sequence[float], std: Sequence[float], to_rgb: bool
) -> jax.Array:
    """``[B, S, S, C]`` in [0, 1] -> ``(x − mean) / std``, greyscale tiled to RGB if asked."""
    if to_rgb and images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    c = images.shape[-1]
    mean = jnp.asarray(mean, jnp.float32).reshape(-1)
    std = jnp.asarray(std, jnp.float32).reshape(-1)
    if mean.shape[0] not in (1, c) or std.shape[0] not in (1, c):
        raise ValueError(
            f"mean {tuple(mean.tolist())} / std {tuple(std.tolist())} do not fit {c}-channel "
            "images: give one value per channel (or one for all); for 1-channel images and an "
            "RGB model's statistics pass to_rgb=True."
        )
    return (images - mean) / std


def eval_preprocess(
    images: jax.Array,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    to_rgb: bool = False,
) -> jax.Array:
    """Test transform: resize to ``image_size`` (bilinear) and normalise.

    Args:
      images: uint8 ``[B, h, w, C]``, C = 1 or 3.
      image_size: output side S.
      mean, std: per-channel statistics in [0, 1] units (e.g. ImageNet's).
      to_rgb: tile 1-channel images to 3 channels (for a model trained on RGB).

    Returns:
      float32 ``[B, S, S, C]`` (C = 3 if ``to_rgb``).
    """
    _check_images(images)
    x = _resize(images.astype(jnp.float32) / 255.0, image_size)
    return _normalize(x, mean, std, to_rgb)


def train_augment(
    images: jax.Array,
    key: jax.Array,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    randaugment: bool = True,
    num_ops: int = 2,
    magnitude: int = 9,
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.0),
    flip: bool = True,
    to_rgb: bool = False,
) -> jax.Array:
    """Training transform of the paper: RandAugment → ColorJitter → resize → flip → normalise.

    Args:
      images: uint8 ``[B, h, w, C]`` at the stored resolution, C = 1 or 3.
      key: PRNG key of this step (e.g. ``fold_in(rng, step)``); every image derives its own.
      image_size: output side S (the model's input, 224 for DeiT).
      mean, std: per-channel normalisation in [0, 1] units.
      randaugment: apply RandAugment(``num_ops``, ``magnitude``) (31 magnitude bins).
      num_ops, magnitude: RandAugment's N and M.
      color_jitter: ``(brightness, contrast, saturation, hue)``; zeros skip ColorJitter.
      flip: random horizontal flip with probability 0.5.
      to_rgb: tile 1-channel images to 3 channels at the end.

    Returns:
      float32 ``[B, S, S, C]`` (C = 3 if ``to_rgb``), a deterministic function of the key.
    """
    _check_images(images)
    k_ra, k_cj, k_flip = jax.random.split(key, 3)
    x = images.astype(jnp.float32) / 255.0
    if randaugment and num_ops > 0:
        x = rand_augment(x, k_ra, num_ops=num_ops, magnitude=magnitude)
    if any(v > 0 for v in color_jitter):
        b, c, s, h = color_jitter
        x = jitter_colors(x, k_cj, brightness=b, contrast=c, saturation=s, hue=h)
    x = _resize(x, image_size)
    if flip:
        keys = jax.random.split(k_flip, x.shape[0])
        x = jax.vmap(pix.random_flip_left_right)(keys, x)
    return _normalize(x, mean, std, to_rgb)
