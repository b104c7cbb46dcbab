"""Cost of the ADC operator (K-means, token selection, merge) beside the client forward it follows.

    python benchmarks/compress.py [--batch 128 --clusters 40 --tokens 62 --steps 10]

Times, in one run on the default device, the median of ``--steps`` calls (after warm-up, each
ending in ``block_until_ready``) of:

* ``client_forward``: the jitted ``apply_client`` of DeiT-Tiny cut after block 3 (patch embedding
  and three blocks) on a batch of ``B`` random 224 px images;
* ``compress``: the jitted :func:`adc_jax.compress` on that forward's own tokens ``[B, N, D]`` and
  scores ``[B, N]`` (so K-means sees real attention rows), with 100-class one-hot labels;
* ``compress_max_iters``: the same with ``tol=-1``, so K-means always runs its 50 Lloyd iterations
  (a randomly initialised client's scores converge in a few; the worst case bounds any model);
* ``cluster`` and ``merge``: its two halves (:func:`adc_jax.compress.cluster` on the scores,
  :func:`adc_jax.compress.merge` on the ``[B, k, D]`` kept tokens), as the ADC client runs them;

and prints one JSON object per line (``record="time"``, ``phase``, ``median_s``, device and
versions), then ``record="ratio"`` with ``compress / client_forward``.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import configure_xla, emit, environment, peak_memory, timed  # noqa: E402

from adc_jax import compress, vit  # noqa: E402
from adc_jax.compress import cluster, merge  # noqa: E402
from adc_jax.kmeans import kmeans  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--split-index", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--clusters", type=int, default=40, help="T")
    p.add_argument("--tokens", type=int, default=62, help="k")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--xla-default", dest="xla_tuned", action="store_false")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure_xla(args.xla_tuned)
    model = vit.make_model(args.model, split_index=args.split_index)
    cfg = model.config
    params = model.init(jax.random.key(0))["client"]
    shape = (args.batch, cfg.image_size, cfg.image_size, cfg.in_chans)
    images = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    labels = jax.nn.one_hot(
        jax.random.randint(jax.random.key(2), (args.batch,), 0, args.num_classes),
        args.num_classes,
    )
    key = jax.random.key(3)
    sizes = dict(num_clusters=args.clusters, num_tokens=args.tokens)
    base = {
        "model": args.model,
        "split_index": args.split_index,
        "batch": args.batch,
        "seq_len": model.seq_len,
        "width": model.width,
        **sizes,
        **environment(),
    }

    client = jax.jit(model.apply_client)
    tokens, scores = client(params, images)
    compress_fn = jax.jit(partial(compress, **sizes, key=key, labels=labels))
    worst_fn = jax.jit(partial(compress, **sizes, key=key, labels=labels, tol=-1.0))
    cluster_fn = jax.jit(partial(cluster, **sizes, key=key))
    clusters = cluster_fn(scores)
    kept = jnp.take_along_axis(tokens, clusters.positions[:, :, None], axis=1)
    merge_fn = jax.jit(partial(merge, labels=labels))
    iters = jax.jit(lambda s: kmeans(s, args.clusters, key).num_iters)(scores)

    results = {
        "client_forward": timed(lambda: client(params, images), args.steps, 2),
        "compress": timed(lambda: compress_fn(tokens, scores), args.steps, 2),
        "compress_max_iters": timed(lambda: worst_fn(tokens, scores), args.steps, 2),
        "cluster": timed(lambda: cluster_fn(scores), args.steps, 2),
        "merge": timed(lambda: merge_fn(kept, clusters), args.steps, 2),
    }
    for phase, result in results.items():
        extra = {} if phase == "client_forward" else {"kmeans_iters": int(iters)}
        if phase == "compress_max_iters":
            extra = {"kmeans_iters": 50}
        emit({"record": "time", "phase": phase, **result, **extra, **base})
    forward = results["client_forward"]["median_s"]
    emit(
        {
            "record": "ratio",
            "compress_over_client_forward": results["compress"]["median_s"] / forward,
            "compress_max_iters_over_client_forward": (
                results["compress_max_iters"]["median_s"] / forward
            ),
            "cluster_plus_merge_over_client_forward": (
                results["cluster"]["median_s"] + results["merge"]["median_s"]
            )
            / forward,
            **base,
        }
    )
    emit({"record": "memory", **peak_memory(), **base})


if __name__ == "__main__":
    main()
