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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- attention: the two forms of the blocks ------------------------------------------------------


def grads(fn, *args):
    """Value and the vjp of a random cotangent (one jitted program), for comparing two
    implementations."""

    def value_and_vjp(*args):
        out, vjp = jax.vjp(fn, *args)
        cot = jax.tree.map(lambda o: jax.random.normal(jax.random.key(9), o.shape, o.dtype), out)
        return out, vjp(cot)

    return jax.jit(value_and_vjp)(*args)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _softmax_einsum(q, k, v):
    """The textbook form: ``[B, n, H, hd]`` queries, ``[B, N, H, hd]`` keys and values."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), probs[:, :, 0].mean(axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("num_queries", [9, 3, 1])  # all rows; the selected-rows form; CLS only
def test_attention_equals_softmax_einsum(num_queries):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, num_queries, 3, 8))
    k, v = (2 * jax.random.normal(key, (2, 9, 3, 8)) for key in keys[1:])
    reference = grads(_softmax_einsum, q, k, v)
    (out, row), g = grads(vit.attention, q, k, v)
    assert out.shape == (2, num_queries, 3, 8) and row.shape == (2, 9)
    np.testing.assert_allclose(row.sum(-1), 1.0, rtol=1e-6)
    assert_close((out, row), reference[0])
    assert_close(g, reference[1], rtol=1e-4, atol=1e-5)
    fused = lambda q, k, v: vit.dot_product_attention(q, k, v)
    assert_close(grads(fused, q, k, v), grads(lambda *a: _softmax_einsum(*a)[0], q, k, v))


@pytest.mark.slow
def test_block_gives_the_same_output_with_and_without_the_cls_row():
    """The last client block (returns the row) and every other block compute the same function,
    gradients included."""
    block = vit.Block(CONFIG.num_heads, CONFIG.mlp_dim)
    x = jax.random.normal(jax.random.key(4), (2, 17, 32))
    params = block.init(jax.random.key(5), x)

    def run(with_row):
        return lambda p, x: block.apply(p, x, with_row)[0]

    assert_close(grads(run(True), params, x), grads(run(False), params, x), rtol=1e-5, atol=1e-6)
    _, row = block.apply(params, x, True)
    assert row.shape == (2, 17) and block.apply(params, x)[1] is None


def test_attention_choice_on_this_backend():
    """On a CPU "auto" is XLA's attention (cuDNN's kernel is a GPU custom call), even in
    bfloat16; an unknown choice fails when the model is built."""
    q = jnp.ones((1, 5, 2, 8), jnp.bfloat16)
    lowered = jax.jit(vit.dot_product_attention).lower(q, q, q).as_text()
    assert "custom_call" not in lowered and "dot_general" in lowered
    with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'xla', 'cudnn'\)"):
        vit.make_model(NAME, split_index=2, attention="flash")


def test_bfloat16_gradients_keep_the_input_dtype():
    """A bfloat16 model's gradients (what the server sends back) stay bfloat16; parameter
    gradients are float32, like the parameters."""
    model = vit.make_model(NAME, split_index=2, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(6))
    tokens = jnp.ones((2, 17, 32), jnp.bfloat16)
    loss = lambda p, t: model.apply_server(p, t).sum()
    param_grads, token_grad = jax.jit(jax.grad(loss, (0, 1)))(params["server"], tokens)
    assert token_grad.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(param_grads))
