"""What test_split.py and test_select.py share: the tiny split ViT, a batch, protocols, states.

The fixtures are registered in conftest.py (one per test run: one model, one set of parameters).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adc_jax import split, vit
from adc_jax.methods import CutShape

B, C = 16, 10  # batch, classes
IMAGE = (16, 16, 3)


def make_model():
    return vit.make_model("vit_test_patch4_16", split_index=2, num_classes=C)


def make_batch():
    images = jax.random.normal(jax.random.key(1), (B, *IMAGE))
    return {"image": images, "label": jnp.arange(B, dtype=jnp.int32) % C}


def make_protocol(model, method, **kwargs):
    # SGD, not Adam: the key bias of attention has an exactly-zero gradient (softmax ignores a
    # constant shift), and Adam would turn its rounding noise into ±lr steps that differ between
    # two equally correct programs.
    return split.Protocol(
        client_apply=model.apply_client,
        server_apply=model.apply_server,
        method=method,
        num_classes=C,
        client_tx=optax.sgd(0.1),
        server_tx=optax.sgd(0.1),
        **kwargs,
    )


def fresh_state(protocol, model, params, batch_size=B):
    cut = CutShape(batch_size, model.seq_len, model.width, C)
    state = split.init_state(protocol, jax.random.key(2), params["client"], params["server"], cut)
    return jax.tree.map(jnp.copy, state)  # the programs donate their inputs


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
