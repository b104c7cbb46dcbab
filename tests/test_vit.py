"""ViT/DeiT client and server: configs, errors, split parity with a NumPy timm forward, scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_reference as R

from adc_jax import pretrained, vit

NAME = "vit_test_patch4_16"
CONFIG = vit.MODELS[NAME]
ARCH = R.Arch(
    CONFIG.width,
    CONFIG.depth,
    CONFIG.num_heads,
    CONFIG.mlp_dim,
    CONFIG.patch_size,
    CONFIG.image_size,
    CONFIG.in_chans,
    CONFIG.num_classes,
)
SPLITS = range(1, CONFIG.depth)
TOL = 1e-4


@pytest.fixture(scope="module")
def state():
    return R.random_state(ARCH, seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return rng.standard_normal((3, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(state, images):
    """NumPy float64 forward: (logits, tokens after each block, attention of each block)."""
    return R.forward(state, images, CONFIG.num_heads)


@pytest.fixture(scope="module")
def split_runs(state, images):
    """Per split index: model, params converted from the timm state, jitted halves, outputs."""
    runs = {}
    for split in SPLITS:
        model = vit.make_model(NAME, split_index=split)
        params = pretrained.params_from_timm(state, CONFIG, split)
        client = jax.jit(model.apply_client)
        server = jax.jit(model.apply_server)
        tokens, scores = client(params["client"], images)
        runs[split] = dict(
            model=model,
            params=params,
            server=server,
            tokens=tokens,
            scores=scores,
            logits=server(params["server"], tokens),
            full=model.apply_full(params, images),  # eager: one compile fewer per split
        )
    return runs


# ---- configs and errors -------------------------------------------------------------------------


def test_registry_values():
    tiny = vit.get_model_config("deit_tiny_patch16_224")
    assert (tiny.width, tiny.depth, tiny.num_heads, tiny.mlp_dim) == (192, 12, 3, 768)
    assert (tiny.image_size, tiny.patch_size, tiny.in_chans, tiny.num_classes) == (224, 16, 3, 1000)
    assert tiny.mean == (0.485, 0.456, 0.406) and tiny.std == (0.229, 0.224, 0.225)
    assert tiny.seq_len == 197 and tiny.head_dim == 64
    mini = vit.get_model_config("vit_mini_patch4_28")
    assert (mini.seq_len, mini.in_chans, mini.mean, mini.std) == (50, 1, (0.2860,), (0.3530,))
    assert CONFIG.seq_len == 17
    other = vit.get_model_config("deit_small_patch16_224", num_classes=100, image_size=384)
    assert (other.num_classes, other.image_size, other.seq_len, other.width) == (100, 384, 577, 384)


@pytest.mark.parametrize(
    "name, count",
    # timm's parameter counts of the DeiT models (sum of numel over model.parameters()).
    [
        ("deit_tiny_patch16_224", 5_717_416),
        ("deit_small_patch16_224", 22_050_664),
        ("deit_base_patch16_224", 86_567_656),
    ],
)
def test_parameter_count_matches_timm(name, count):
    model = vit.make_model(name, split_index=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="Unknown model 'deit_huge'") as err:
        vit.get_model_config("deit_huge")
    for name in vit.MODELS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="Unknown model"):
        vit.make_model("deit_huge", split_index=3)


def test_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="image size 200 is not divisible by the patch size 16"):
        vit.get_model_config("deit_tiny_patch16_224", image_size=200)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        vit.make_model(NAME, split_index=2, image_size=18)


@pytest.mark.parametrize("split", [0, -1, CONFIG.depth, 99])
def test_split_index_out_of_range(split):
    with pytest.raises(ValueError, match=r"split_index must be in 1\.\.3 .* got " + str(split)):
        vit.make_model(NAME, split_index=split)
    with pytest.raises(ValueError, match="split_index must be in"):
        vit.Client(CONFIG, split).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_client_rejects_wrong_image_shape():
    model = vit.make_model(NAME, split_index=2)
    with pytest.raises(ValueError, match=r"expects images \[B, 16, 16, 3\]"):
        model.client.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


# ---- init ---------------------------------------------------------------------------------------


def test_init_tree_layout_and_dtypes():
    model = vit.make_model(NAME, split_index=1)
    params = model.init(jax.random.key(0))
    client, server = params["client"], params["server"]
    assert set(client) == {"patch_embed", "cls_token", "pos_embed", "blocks_0"}
    assert set(server) == {"blocks_1", "blocks_2", "blocks_3", "norm", "head"}
    assert client["patch_embed"]["kernel"].shape == (4, 4, 3, 32)
    assert client["pos_embed"].shape == (1, 17, 32)
    assert server["blocks_1"]["attn"]["qkv"]["kernel"].shape == (32, 96)
    assert server["head"]["kernel"].shape == (32, 10)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # Deterministic in the key, and the two sides drawn from different subkeys.
    again = model.init(jax.random.key(0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, again))
    assert not np.allclose(
        client["blocks_0"]["attn"]["qkv"]["kernel"], server["blocks_1"]["attn"]["qkv"]["kernel"]
    )
    kernel = server["blocks_2"]["mlp"]["fc1"]["kernel"]
    assert abs(float(kernel.std()) - 0.02) < 0.004 and float(abs(kernel).max()) <= 0.04 + 1e-6
    tokens, scores = model.apply_client(client, jnp.ones((2, 16, 16, 3)))
    assert tokens.shape == (2, 17, 32) and bool(jnp.isfinite(scores).all())


def test_split_vit_is_a_static_jit_argument(split_runs, images):
    a = vit.make_model(NAME, split_index=2)
    b = vit.make_model(NAME, split_index=2)
    assert a == b and hash(a) == hash(b)
    assert (a.seq_len, a.width, a.depth) == (17, 32, 4)
    f = jax.jit(lambda m, p, x: m.apply_client(p, x)[0], static_argnums=0)
    run = split_runs[2]
    np.testing.assert_allclose(f(b, run["params"]["client"], images), run["tokens"], atol=1e-6)


# ---- parity with the NumPy timm forward ----------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_split_forward_equals_reference(split, split_runs, reference):
    run = split_runs[split]
    ref_logits, ref_tokens, _ = reference
    assert run["tokens"].shape == (3, 17, 32) and run["tokens"].dtype == jnp.float32
    np.testing.assert_allclose(run["tokens"], ref_tokens[split - 1], atol=TOL, rtol=0)
    np.testing.assert_allclose(run["logits"], ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(run["full"], ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(run["full"], run["logits"], atol=1e-5, rtol=0)  # eager vs jit


@pytest.mark.parametrize("split", SPLITS)
def test_scores_are_the_cls_attention_of_the_last_client_block(split, split_runs, reference):
    scores = split_runs[split]["scores"]
    attn = reference[2][split - 1]  # [B, H, N, N] of block split-1
    assert scores.shape == (3, 17) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
    assert bool((scores >= 0).all())
    np.testing.assert_allclose(scores, attn[:, :, 0, :].mean(1), atol=1e-5, rtol=0)
    # Not the previous block's, and not uniform: the check above would catch a wrong block.
    if split > 1:
        assert np.abs(scores - reference[2][split - 2][:, :, 0].mean(1)).max() > 1e-2


@pytest.mark.parametrize("keep", [[0, 5, 2], [0]])
def test_server_accepts_fewer_tokens(keep, split_runs, state):
    split = 2
    run = split_runs[split]
    tokens = run["tokens"][:, jnp.asarray(keep)]
    logits = run["server"](run["params"]["server"], tokens)
    assert logits.shape == (3, 10)
    expected = R.server_forward(state, np.asarray(tokens), split, CONFIG.num_heads)
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_bfloat16_compute_is_close_to_float32(split_runs, images):
    run = split_runs[2]
    model = vit.make_model(NAME, split_index=2, dtype=jnp.bfloat16)
    tokens, scores = jax.jit(model.apply_client)(run["params"]["client"], images)
    logits = jax.jit(model.apply_full)(run["params"], images)
    assert tokens.dtype == jnp.bfloat16
    assert scores.dtype == jnp.float32 and logits.dtype == jnp.float32
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
    scale = float(jnp.abs(run["full"]).max())
    assert float(jnp.abs(logits - run["full"]).max()) < 0.05 * scale
    assert float(jnp.abs(scores - run["scores"]).max()) < 0.05 * float(run["scores"].max())


def test_gradients_reach_both_halves_but_not_through_scores(split_runs, images):
    run = split_runs[2]
    model, params = run["model"], run["params"]

    def loss(params):
        return jax.nn.logsumexp(model.apply_full(params, images), axis=-1).mean()

    def score_sum(client_params):
        return model.apply_client(client_params, images)[1][:, 1:].max()

    grads, score_grads = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(score_sum)(p["client"])))(
        params
    )
    for side in ("client", "server"):
        leaves = jax.tree.leaves(grads[side])
        assert all(bool(jnp.isfinite(g).all()) for g in leaves)
        assert all(float(jnp.abs(g).max()) > 0 for g in leaves)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(score_grads))


def test_add_over_batch_gradients_equal_the_broadcast_sum():
    x = jax.random.normal(jax.random.key(0), (5, 7, 3))
    y = jax.random.normal(jax.random.key(1), (1, 7, 3))

    def loss(add, x, y):
        return jnp.sum(jnp.sin(add(x, y)) * jnp.arange(3.0))

    ours = jax.jit(jax.grad(lambda x, y: loss(vit.add_over_batch, x, y), (0, 1)))(x, y)
    plain = jax.grad(lambda x, y: loss(jnp.add, x, y), (0, 1))(x, y)
    for a, b in zip(ours, plain, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    bf16 = jax.grad(lambda y: loss(vit.add_over_batch, x.astype(jnp.bfloat16), y))(
        y.astype(jnp.bfloat16)
    )
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), plain[1], rtol=0.05, atol=0.05)
    for bad in (y[0], y.astype(jnp.bfloat16)):
        with pytest.raises(ValueError, match=r"y must be \[1, \*x.shape\[1:\]\] of x's dtype"):
            vit.add_over_batch(x, bad)
