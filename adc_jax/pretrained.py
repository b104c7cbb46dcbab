"""timm / Hugging Face safetensors checkpoints → client and server parameters (and back).

Public entry point::

    model, params = load_timm("timm/deit_tiny_patch16_224.fb_in1k",
                              model_name="deit_tiny_patch16_224", split_index=3,
                              num_classes=100, key=jax.random.key(0))
    logits = model.apply_full(params, images)  # images NHWC, normalised with model.config.mean/std

The file is read with ``safetensors.numpy`` (no torch). Every tensor of the file must map to a
parameter with the right shape and every parameter must come from the file; otherwise
:class:`CheckpointMismatchError` lists the missing, unexpected and mis-shaped keys. Name mapping
(timm → ours, ``i`` global block index, ``side`` = client if ``i < split_index`` else server)::

    patch_embed.proj.weight [D, C, p, p] (OIHW) → client/patch_embed/kernel [p, p, C, D] (HWIO)
    patch_embed.proj.bias                       → client/patch_embed/bias
    cls_token, pos_embed                        → client/cls_token, client/pos_embed
    blocks.{i}.norm{1,2}.{weight,bias}          → side/blocks_{i}/norm{1,2}/{scale,bias}
    blocks.{i}.attn.{qkv,proj}.weight [out, in] → side/blocks_{i}/attn/{qkv,proj}/kernel [in, out]
    blocks.{i}.mlp.{fc1,fc2}.weight  [out, in]  → side/blocks_{i}/mlp/{fc1,fc2}/kernel [in, out]
    (….bias of each linear                      → …/bias)
    norm.{weight,bias}                          → server/norm/{scale,bias}
    head.weight [C, D], head.bias               → server/head/kernel [D, C], server/head/bias
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from adc_jax import vit

logger = logging.getLogger(__name__)

HUB_FILENAME = "model.safetensors"
_HUB_PREFIXES = ("hf-hub:", "hf_hub:")

Params = vit.Params
StateDict = dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: missing, unexpected or mis-shaped keys."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched  # key → (shape in file, expected shape)


# ------------------------------------------------------------------------------------------------
# Name and layout mapping
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    timm_key: str
    side: str  # "client" or "server"
    path: tuple[str, ...]  # inside the side's parameter tree
    shape: tuple[int, ...]  # timm's shape
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_timm: Callable[[np.ndarray], np.ndarray]


_same = lambda a: a
_linear = lambda a: a.T  # torch Linear weight [out, in] ↔ Dense kernel [in, out]
_oihw_to_hwio = lambda a: a.transpose(2, 3, 1, 0)
_hwio_to_oihw = lambda a: a.transpose(3, 2, 0, 1)


def _entries(config: vit.ViTConfig, split_index: int) -> Iterator[_Entry]:
    """Every timm tensor of ``config``'s model, where it lives in ours, and how to convert it."""
    d, m, p, c = config.width, config.mlp_dim, config.patch_size, config.in_chans

    def e(key, side, path, shape, to_flax=_same, to_timm=_same):
        return _Entry(key, side, tuple(path.split("/")), shape, to_flax, to_timm)

    def norm(key, side, path):
        yield e(f"{key}.weight", side, f"{path}/scale", (d,))
        yield e(f"{key}.bias", side, f"{path}/bias", (d,))

    def linear(key, side, path, n_out, n_in):
        yield e(f"{key}.weight", side, f"{path}/kernel", (n_out, n_in), _linear, _linear)
        yield e(f"{key}.bias", side, f"{path}/bias", (n_out,))

    yield e("cls_token", "client", "cls_token", (1, 1, d))
    yield e("pos_embed", "client", "pos_embed", (1, config.seq_len, d))
    yield e("patch_embed.proj.weight", "client", "patch_embed/kernel", (d, c, p, p),
            _oihw_to_hwio, _hwio_to_oihw)  # fmt: skip
    yield e("patch_embed.proj.bias", "client", "patch_embed/bias", (d,))
    for i in range(config.depth):
        side = "client" if i < split_index else "server"
        t, f = f"blocks.{i}", f"blocks_{i}"
        yield from norm(f"{t}.norm1", side, f"{f}/norm1")
        yield from linear(f"{t}.attn.qkv", side, f"{f}/attn/qkv", 3 * d, d)
        yield from linear(f"{t}.attn.proj", side, f"{f}/attn/proj", d, d)
        yield from norm(f"{t}.norm2", side, f"{f}/norm2")
        yield from linear(f"{t}.mlp.fc1", side, f"{f}/mlp/fc1", m, d)
        yield from linear(f"{t}.mlp.fc2", side, f"{f}/mlp/fc2", d, m)
    yield from norm("norm", "server", "norm")
    yield from linear("head", "server", "head", config.num_classes, d)


def timm_shapes(config: vit.ViTConfig) -> dict[str, tuple[int, ...]]:
    """``{timm key: shape}`` of every tensor in a timm checkpoint of ``config``'s model."""
    return {x.timm_key: x.shape for x in _entries(config, split_index=1)}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def params_from_timm(
    state: Mapping[str, np.ndarray], config: vit.ViTConfig, split_index: int
) -> dict[str, Params]:
    """Convert a checked timm state dict to ``{"client": …, "server": …}`` (float32 jax arrays).

    Raises:
      CheckpointMismatchError: see :func:`check_timm_state`.
    """
    check_timm_state(state, config)
    vit.SplitViT(config, split_index)  # validates split_index
    params: dict[str, dict] = {"client": {}, "server": {}}
    for x in _entries(config, split_index):
        value = x.to_flax(np.asarray(state[x.timm_key], dtype=np.float32))
        _set(params[x.side], x.path, jnp.asarray(value))
    return params


def params_to_timm(
    params: Mapping[str, Params], config: vit.ViTConfig, split_index: int
) -> StateDict:
    """Inverse of :func:`params_from_timm`: ``{timm key: float32 numpy array}``."""
    return {
        x.timm_key: np.ascontiguousarray(
            x.to_timm(np.asarray(_get(params[x.side], x.path), dtype=np.float32))
        )
        for x in _entries(config, split_index)
    }


def _describe(state: Mapping[str, np.ndarray]) -> str:
    """A one-line guess at the architecture a timm state dict holds, for error messages."""
    try:
        d = state["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        p = state["patch_embed.proj.weight"].shape[-1]
        n = state["pos_embed"].shape[1]
        return f"the file holds width {d}, depth {depth}, patch {p}, {n} tokens."
    except (KeyError, IndexError, AttributeError):
        return "the file does not look like a timm VisionTransformer checkpoint."


def check_timm_state(state: Mapping[str, np.ndarray], config: vit.ViTConfig) -> None:
    """Assert that ``state`` has exactly the tensors of ``config``'s model, with timm's shapes.

    Raises:
      CheckpointMismatchError (a ValueError): lists missing keys, unexpected keys and mis-shaped
        keys (file shape vs expected), and which registered model the file looks like, if any.
    """
    expected = timm_shapes(config)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = {
        k: (tuple(state[k].shape), shape)
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    }
    if not (missing or unexpected or mismatched):
        return

    def listing(title, items):
        items = list(items)
        shown = ", ".join(items[:12]) + (f", … ({len(items) - 12} more)" if len(items) > 12 else "")
        return f"\n  {title} ({len(items)}): {shown}" if items else ""

    message = (
        f"Checkpoint does not match {config.name} (width {config.width}, depth {config.depth}, "
        f"patch {config.patch_size}, {config.seq_len} tokens, {config.num_classes} classes): "
        f"{_describe(state)}"
        + listing("missing", missing)
        + listing("unexpected", unexpected)
        + listing(
            "mis-shaped (file vs expected)", (f"{k} {a} vs {b}" for k, (a, b) in mismatched.items())
        )
    )
    guesses = [
        name for name, other in vit.MODELS.items() if name != config.name and _matches(state, other)
    ]
    if guesses:
        message += f"\n  The file looks like a checkpoint of: {', '.join(guesses)}."
    raise CheckpointMismatchError(
        message, missing=missing, unexpected=unexpected, mismatched=mismatched
    )


def _matches(state: Mapping[str, np.ndarray], config: vit.ViTConfig) -> bool:
    """Whether ``state`` is a checkpoint of ``config`` up to the number of classes."""
    if "head.weight" in state:
        config = dataclasses.replace(config, num_classes=max(1, state["head.weight"].shape[0]))
    expected = timm_shapes(config)
    return expected.keys() == state.keys() and all(
        tuple(state[k].shape) == s for k, s in expected.items()
    )


# ------------------------------------------------------------------------------------------------
# Position embedding resize
# ------------------------------------------------------------------------------------------------


def resize_pos_embed(pos_embed: np.ndarray, grid_size: int) -> np.ndarray:
    """Resample ``pos_embed [1, 1 + g², D]`` to ``[1, 1 + grid_size², D]``; CLS entry kept.

    Bicubic over the patch grid with antialiasing, as timm's ``resample_abs_pos_embed`` (its
    defaults: ``interpolation='bicubic', antialias=True``); ``jax.image.resize`` uses the same Keys
    cubic (a = -0.5) and the same kernel widening when shrinking.
    """
    pos_embed = np.asarray(pos_embed, np.float32)
    n_old = pos_embed.shape[1] - 1
    g_old = int(round(n_old**0.5))
    if g_old * g_old != n_old:
        raise ValueError(f"pos_embed has {n_old} patch entries, not a square grid.")
    if g_old == grid_size:
        return pos_embed
    d = pos_embed.shape[-1]
    grid = jnp.asarray(pos_embed[0, 1:].reshape(g_old, g_old, d))
    grid = jax.image.resize(grid, (grid_size, grid_size, d), method="bicubic", antialias=True)
    grid = np.asarray(grid, np.float32).reshape(1, grid_size * grid_size, d)
    return np.concatenate([pos_embed[:, :1], grid], axis=1)


# ------------------------------------------------------------------------------------------------
# Files and the hub
# ------------------------------------------------------------------------------------------------


def _is_hub_id(source: str) -> bool:
    if source.startswith(_HUB_PREFIXES):
        return True
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.endswith(".safetensors")


def resolve_source(source: str | os.PathLike) -> str:
    """A local ``.safetensors`` path for ``source``: a local file, or a hub id downloaded.

    A hub id (``"timm/deit_tiny_patch16_224.fb_in1k"``, optionally prefixed ``hf-hub:``) fetches
    its ``model.safetensors`` with ``huggingface_hub.hf_hub_download`` (cached).

    Raises:
      FileNotFoundError: a path that does not exist.
      OSError: the download failed (offline, unknown repo, no ``model.safetensors``).
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if not _is_hub_id(source):
        raise FileNotFoundError(
            f"No checkpoint file at {source!r}. Pass a local .safetensors path or a Hugging Face "
            "hub id such as 'timm/deit_tiny_patch16_224.fb_in1k'."
        )
    repo_id = source
    for prefix in _HUB_PREFIXES:
        repo_id = repo_id.removeprefix(prefix)
    import huggingface_hub  # only when a hub id is given: its import takes a moment

    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=HUB_FILENAME)
    except Exception as e:  # offline, unknown repo, missing file: all need the same advice
        raise OSError(
            f"Could not download {HUB_FILENAME} of {repo_id!r} from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Check the id and the network, or download the file "
            "elsewhere and pass its local .safetensors path."
        ) from e


def read_state(path: str | os.PathLike) -> StateDict:
    """All tensors of a ``.safetensors`` file as numpy arrays (no torch).

    bfloat16 files read too: importing JAX registers ``ml_dtypes.bfloat16`` with numpy.
    Conversion widens every tensor to float32.
    """
    return safetensors.numpy.load_file(os.fspath(path))


# ------------------------------------------------------------------------------------------------
# Load and save
# ------------------------------------------------------------------------------------------------


def load_timm(
    source: str | os.PathLike,
    *,
    model_name: str,
    split_index: int,
    num_classes: int | None = None,
    key: jax.Array | None = None,
    image_size: int | None = None,
    dtype: vit.Dtype = jnp.float32,
    fresh_head: bool = False,
) -> tuple[vit.SplitViT, dict[str, Params]]:
    """Load a timm ViT/DeiT checkpoint as a :class:`~adc_jax.vit.SplitViT` and its parameters.

    Args:
      source: a local ``.safetensors`` path or a hub id (``"timm/deit_tiny_patch16_224.fb_in1k"``).
      model_name: a registered model (:data:`adc_jax.vit.MODELS`); the file must hold exactly its
        tensors (the head may have any number of classes, the position grid any size).
      split_index: blocks on the client, 1..L-1.
      num_classes: ``None`` or the checkpoint's class count keeps the checkpoint's head; another
        value replaces it with a fresh head drawn from ``key`` (logged as a warning).
      fresh_head: replace the head even when the class count is the checkpoint's (fine-tuning on
        another task with as many classes).
      key: PRNG key for a new head; required when the head is replaced.
      image_size: input size; ``None`` keeps the checkpoint's (read off its ``pos_embed`` grid:
        224 for the DeiT checkpoints). Another size resamples the position embedding (bicubic
        over the patch grid, CLS entry kept, as timm does).
      dtype: compute dtype of the returned model (parameters are float32 either way).

    Returns:
      ``(model, {"client": params, "server": params})``.

    Raises:
      CheckpointMismatchError: the file is not a checkpoint of ``model_name``.
      ValueError: unknown model, bad split index or image size, or a new head without ``key``.
    """
    base = vit.get_model_config(model_name)
    vit.SplitViT(base, split_index)  # fail on a bad split before reading a large file
    vit.get_model_config(model_name, num_classes=num_classes, image_size=image_size)  # validate
    path = resolve_source(source)
    state = read_state(path)

    # The checkpoint's head size and resolution come from the file; every other shape is fixed
    # by model_name and checked below.
    head = state.get("head.weight")
    ckpt_classes = head.shape[0] if head is not None and head.ndim == 2 else base.num_classes
    ckpt_config = dataclasses.replace(
        base,
        num_classes=max(1, ckpt_classes),
        image_size=_checkpoint_image_size(state, base) or base.image_size,
    )
    target = dataclasses.replace(
        ckpt_config,
        num_classes=num_classes or ckpt_config.num_classes,
        image_size=image_size or ckpt_config.image_size,
    )
    new_head = fresh_head or target.num_classes != ckpt_config.num_classes
    if new_head and key is None:
        raise ValueError(
            f"The {ckpt_config.num_classes}-class head of the checkpoint is replaced by a new "
            f"{target.num_classes}-class head: pass key=jax.random.key(...) to draw it."
        )
    params = params_from_timm(state, ckpt_config, split_index)

    if new_head:
        logger.warning(
            "%s: replacing the checkpoint's %d-class head with a new %d-class head.",
            model_name,
            ckpt_config.num_classes,
            target.num_classes,
        )
        params["server"]["head"] = vit.init_head(key, target.width, target.num_classes)
    if target.image_size != ckpt_config.image_size:
        logger.info(
            "%s: resampling pos_embed from %d² to %d² patches.",
            model_name,
            ckpt_config.grid_size,
            target.grid_size,
        )
        params["client"]["pos_embed"] = jnp.asarray(
            resize_pos_embed(np.asarray(params["client"]["pos_embed"]), target.grid_size)
        )
    return vit.SplitViT(target, split_index, dtype), params


def _checkpoint_image_size(state: Mapping[str, np.ndarray], base: vit.ViTConfig) -> int | None:
    """The image size a checkpoint was trained at, from its ``pos_embed [1, 1 + g², D]``."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != base.width:
        return None  # left to check_timm_state to report
    g = math.isqrt(pos.shape[1] - 1)
    return g * base.patch_size if g > 0 and g * g == pos.shape[1] - 1 else None


def save_timm(path: str | os.PathLike, model: vit.SplitViT, params: Mapping[str, Params]) -> None:
    """Write ``params`` as a timm-named ``.safetensors`` file (readable by :func:`load_timm`)."""
    state = params_to_timm(params, model.config, model.split_index)
    safetensors.numpy.save_file(state, os.fspath(path))
