"""timm checkpoints → client/server parameters: parity, strict key checks, head, resize, hub."""

import importlib.util
import logging
import os
import pathlib
import subprocess

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import timm_reference as R

from adc_jax import pretrained, vit

NAME = "vit_test_patch4_16"
CONFIG = vit.MODELS[NAME]
TOL = 1e-4
SCRIPT = pathlib.Path(__file__).with_name("_timm_parity_script.py")


def arch(config: vit.ViTConfig) -> R.Arch:
    return R.Arch(
        config.width,
        config.depth,
        config.num_heads,
        config.mlp_dim,
        config.patch_size,
        config.image_size,
        config.in_chans,
        config.num_classes,
    )


# One jit per (model, input shape), shared by every test: SplitViT is a hashable static argument.
_apply_full = jax.jit(
    lambda model, params, images: model.apply_full(params, images), static_argnums=0
)
_apply_client = jax.jit(
    lambda model, params, images: model.apply_client(params, images), static_argnums=0
)


@pytest.fixture(scope="module")
def state():
    return R.random_state(arch(CONFIG), seed=0)


@pytest.fixture(scope="module")
def ckpt(state, tmp_path_factory):
    """A timm-format checkpoint of the tiny test architecture, written with safetensors.numpy."""
    path = tmp_path_factory.mktemp("ckpt") / "vit_test.safetensors"
    safetensors.numpy.save_file(state, str(path))
    return str(path)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((3, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return pretrained.load_timm(ckpt, model_name=NAME, split_index=2)


def write(tmp_path, state, name="ckpt.safetensors"):
    path = str(tmp_path / name)
    safetensors.numpy.save_file(state, path)
    return path


# ---- parity with the NumPy timm forward -----------------------------------------------------


@pytest.mark.slow
def test_converted_checkpoint_matches_numpy_reference(loaded, state, images):
    model, params = loaded
    assert model.config == CONFIG and model.split_index == 2
    logits = _apply_full(model, params, images)
    expected, _, attn = R.forward(state, images, CONFIG.num_heads)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)
    _, scores = _apply_client(model, params["client"], images)
    np.testing.assert_allclose(scores, attn[1][:, :, 0].mean(1), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_true_deit_tiny_shapes(tmp_path):
    config = vit.MODELS["deit_tiny_patch16_224"]
    state = R.random_state(arch(config), seed=3, qkv_gain=1.0)
    model, params = pretrained.load_timm(
        write(tmp_path, state), model_name=config.name, split_index=3
    )
    images = np.random.default_rng(4).standard_normal((2, 224, 224, 3)).astype(np.float32)
    logits = _apply_full(model, params, images)
    expected, _, _ = R.forward(state, images, config.num_heads)
    assert logits.shape == (2, 1000)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("split", range(1, CONFIG.depth))
def test_every_split_takes_its_blocks(ckpt, split):
    _, params = pretrained.load_timm(ckpt, model_name=NAME, split_index=split)
    assert {k for k in params["client"] if k.startswith("blocks_")} == {
        f"blocks_{i}" for i in range(split)
    }
    assert {k for k in params["server"] if k.startswith("blocks_")} == {
        f"blocks_{i}" for i in range(split, CONFIG.depth)
    }


def test_save_timm_round_trip_is_exact(loaded, state, tmp_path):
    model, params = loaded
    path = tmp_path / "back.safetensors"
    pretrained.save_timm(path, model, params)
    back = safetensors.numpy.load_file(str(path))
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_half_precision_checkpoints_load_as_float32(state, tmp_path, loaded):
    half = {
        k: v.astype(jnp.bfloat16 if k.startswith("blocks") else np.float16)
        for k, v in state.items()
    }
    _, params = pretrained.load_timm(write(tmp_path, half), model_name=NAME, split_index=2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    qkv = params["server"]["blocks_3"]["attn"]["qkv"]["kernel"]
    np.testing.assert_allclose(
        qkv, loaded[1]["server"]["blocks_3"]["attn"]["qkv"]["kernel"], rtol=1e-2
    )


# ---- strict key and shape checks ------------------------------------------------------------


def test_checkpoint_of_another_architecture(ckpt):
    with pytest.raises(pretrained.CheckpointMismatchError) as err:
        pretrained.load_timm(ckpt, model_name="vit_mini_patch4_28", split_index=2)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "does not match vit_mini_patch4_28" in message
    assert "the file holds width 32, depth 4, patch 4, 17 tokens" in message
    assert "looks like a checkpoint of: vit_test_patch4_16" in message
    assert "mis-shaped" in message and "patch_embed.proj.weight (32, 3, 4, 4) vs (64, 1, 4, 4)" in (
        message
    )
    assert not err.value.missing and not err.value.unexpected
    assert err.value.mismatched["cls_token"] == ((1, 1, 32), (1, 1, 64))


def test_missing_unexpected_and_misshaped_keys_are_listed(state, tmp_path):
    bad = dict(state)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.1.ls1.gamma"] = np.ones(32, np.float32)
    bad["blocks.2.attn.qkv.weight"] = bad["blocks.2.attn.qkv.weight"].T.copy()
    with pytest.raises(pretrained.CheckpointMismatchError) as err:
        pretrained.load_timm(write(tmp_path, bad), model_name=NAME, split_index=2)
    e = err.value
    assert e.missing == ["blocks.1.mlp.fc2.bias"]
    assert e.unexpected == ["blocks.1.ls1.gamma"]
    assert e.mismatched == {"blocks.2.attn.qkv.weight": ((32, 96), (96, 32))}
    for text in ("missing (1): blocks.1.mlp.fc2.bias", "unexpected (1): blocks.1.ls1.gamma",
                 "blocks.2.attn.qkv.weight (32, 96) vs (96, 32)"):  # fmt: skip
        assert text in str(e)


def test_not_a_vit_checkpoint(tmp_path):
    path = write(tmp_path, {"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)})
    with pytest.raises(pretrained.CheckpointMismatchError, match="not look like a timm") as err:
        pretrained.load_timm(path, model_name=NAME, split_index=2)
    assert err.value.unexpected == ["conv1.weight"] and "cls_token" in err.value.missing


# ---- head ------------------------------------------------------------------------------------


def test_new_head_needs_a_key(ckpt):
    with pytest.raises(ValueError, match=r"10-class head .* replaced by a new 5-class head.*key="):
        pretrained.load_timm(ckpt, model_name=NAME, split_index=2, num_classes=5)


@pytest.mark.slow
def test_new_head_is_drawn_from_key_and_logged(ckpt, loaded, images, caplog):
    _, old = loaded
    with caplog.at_level(logging.WARNING, logger="adc_jax.pretrained"):
        model, params = pretrained.load_timm(
            ckpt, model_name=NAME, split_index=2, num_classes=5, key=jax.random.key(7)
        )
    assert "replacing the checkpoint's 10-class head with a new 5-class head" in caplog.text
    assert model.config.num_classes == 5
    head = params["server"].pop("head")
    assert head["kernel"].shape == (32, 5) and not bool(head["bias"].any())
    assert 0 < float(jnp.abs(head["kernel"]).max()) <= 0.04 + 1e-6  # trunc-normal(0.02)
    rest = {k: v for k, v in old["server"].items() if k != "head"}
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params["server"], rest))
    params["server"]["head"] = head
    assert _apply_full(model, params, images).shape == (3, 5)


def test_same_num_classes_keeps_the_head(ckpt, loaded):
    model, params = pretrained.load_timm(ckpt, model_name=NAME, split_index=2, num_classes=10)
    np.testing.assert_array_equal(
        params["server"]["head"]["kernel"], loaded[1]["server"]["head"]["kernel"]
    )


# ---- position embedding resize ---------------------------------------------------------------


@pytest.mark.slow
def test_image_size_resamples_pos_embed(ckpt, loaded, tmp_path):
    _, old = loaded
    model, params = pretrained.load_timm(ckpt, model_name=NAME, split_index=2, image_size=24)
    pos = params["client"]["pos_embed"]
    assert model.config.image_size == 24 and model.seq_len == 37 and pos.shape == (1, 37, 32)
    np.testing.assert_array_equal(pos[:, 0], old["client"]["pos_embed"][:, 0])  # CLS kept
    images = np.random.default_rng(2).standard_normal((2, 24, 24, 3)).astype(np.float32)
    assert bool(jnp.isfinite(_apply_full(model, params, images)).all())
    # A checkpoint saved at 24 px loads at its own resolution by default.
    path = tmp_path / "24px.safetensors"
    pretrained.save_timm(path, model, params)
    model24, params24 = pretrained.load_timm(path, model_name=NAME, split_index=2)
    assert model24.config.image_size == 24
    np.testing.assert_array_equal(params24["client"]["pos_embed"], pos)


def test_resize_pos_embed_identity_and_smoothness():
    g = np.linspace(0, 1, 4, dtype=np.float32)
    plane = (g[:, None] + 2 * g[None, :]).reshape(1, 16, 1)  # a linear ramp over the grid
    pos = np.concatenate([np.full((1, 1, 1), 9.0, np.float32), plane], axis=1)
    np.testing.assert_array_equal(pretrained.resize_pos_embed(pos, 4), pos)
    up = pretrained.resize_pos_embed(pos, 8)
    assert up.shape == (1, 65, 1) and up[0, 0, 0] == 9.0
    grid = up[0, 1:, 0].reshape(8, 8)
    assert np.all(np.diff(grid, axis=0) > 0) and np.all(np.diff(grid, axis=1) > 0)


def test_image_size_not_divisible(ckpt):
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        pretrained.load_timm(ckpt, model_name=NAME, split_index=2, image_size=30)


def test_bad_split_and_unknown_model(ckpt):
    with pytest.raises(ValueError, match=r"split_index must be in 1\.\.3"):
        pretrained.load_timm(ckpt, model_name=NAME, split_index=4)
    with pytest.raises(ValueError, match="Unknown model 'deit_tinny'"):
        pretrained.load_timm(ckpt, model_name="deit_tinny", split_index=3)


# ---- sources ----------------------------------------------------------------------------------


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="local .safetensors path or a Hugging Face"):
        pretrained.load_timm(tmp_path / "nope.safetensors", model_name=NAME, split_index=2)


def test_hub_id_downloads_model_safetensors(ckpt, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return ckpt

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, _ = pretrained.load_timm("timm/vit_test.x", model_name=NAME, split_index=2)
    pretrained.load_timm("hf-hub:timm/vit_test.y", model_name=NAME, split_index=2)
    assert calls == [
        ("timm/vit_test.x", "model.safetensors"),
        ("timm/vit_test.y", "model.safetensors"),
    ]
    assert model.config == CONFIG


def test_hub_offline_gives_a_clear_error(monkeypatch, tmp_path):
    # The real downloader, in offline mode with an empty cache: fails fast, without the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="Could not download model.safetensors.*local .safetensors"):
        pretrained.load_timm("timm/deit_tiny_patch16_224.fb_in1k", model_name=NAME, split_index=2)


# ---- real timm ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
    """Outputs of ``_timm_parity_script.py``: in-process with torch+timm, else $ADC_TIMM_PYTHON."""
    out = tmp_path_factory.mktemp("timm")
    if importlib.util.find_spec("torch") and importlib.util.find_spec("timm"):
        spec = importlib.util.spec_from_file_location("_timm_parity_script", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(str(out))
    elif python := os.environ.get("ADC_TIMM_PYTHON"):
        done = subprocess.run(
            [python, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=600
        )
        if done.returncode:
            pytest.fail(f"{python} {SCRIPT.name} failed:\n{done.stderr[-3000:]}")
    else:
        pytest.skip(
            "needs torch and timm: install them here, or set ADC_TIMM_PYTHON to a python that has "
            "them (e.g. a separate venv)"
        )
    return out


def test_logits_match_real_timm(timm_outputs):
    model, params = pretrained.load_timm(
        timm_outputs / "deit_tiny.safetensors", model_name="deit_tiny_patch16_224", split_index=3
    )
    images = np.load(timm_outputs / "images.npy")
    logits = _apply_full(model, params, images)
    expected = np.load(timm_outputs / "logits.npy")
    diff = float(np.abs(np.asarray(logits) - expected).max())
    print(f"\nmax |logits - timm| deit_tiny 224 px: {diff:.3g}")
    assert diff <= TOL
    _, scores = _apply_client(model, params["client"], images)
    np.testing.assert_allclose(scores, np.load(timm_outputs / "scores_split3.npy"), atol=1e-6)


def test_resized_model_matches_real_timm(timm_outputs):
    model, params = pretrained.load_timm(
        timm_outputs / "deit_tiny.safetensors",
        model_name="deit_tiny_patch16_224",
        split_index=3,
        image_size=112,
    )
    np.testing.assert_allclose(
        params["client"]["pos_embed"], np.load(timm_outputs / "pos_embed_112.npy"), atol=1e-6
    )
    logits = _apply_full(model, params, np.load(timm_outputs / "images_112.npy"))
    diff = float(np.abs(np.asarray(logits) - np.load(timm_outputs / "logits_112.npy")).max())
    print(f"\nmax |logits - timm| deit_tiny 112 px (resampled pos_embed): {diff:.3g}")
    assert diff <= TOL


def test_fresh_head_replaces_a_head_of_the_same_size(ckpt, loaded):
    kept = loaded[1]["server"]["head"]["kernel"]
    _, params = pretrained.load_timm(
        ckpt, model_name=NAME, split_index=2, num_classes=10, key=jax.random.key(3), fresh_head=True
    )
    head = params["server"]["head"]
    assert head["kernel"].shape == kept.shape and not np.array_equal(head["kernel"], kept)
    assert not bool(head["bias"].any())
    with pytest.raises(ValueError, match="key="):
        pretrained.load_timm(ckpt, model_name=NAME, split_index=2, fresh_head=True)
