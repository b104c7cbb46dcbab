"""Reference outputs from real timm (torch), for ``tests/test_pretrained.py``.

Run with a Python that has torch, timm and safetensors (``python _timm_parity_script.py OUT_DIR``)
or import :func:`generate` in-process. Writes to OUT_DIR:

* ``deit_tiny.safetensors``: the state dict of ``timm.create_model('deit_tiny_patch16_224')``
  with seeded random weights (every tensor perturbed, so LayerNorms and biases are not trivial);
* ``images.npy`` ``[2, 224, 224, 3]`` NHWC inputs and ``logits.npy`` ``[2, 1000]``;
* ``scores_split3.npy`` ``[2, 197]``: head-mean CLS row of block 2's softmax attention;
* ``images_112.npy``, ``logits_112.npy``: the same weights loaded by timm into a 112-px model
  (timm resamples ``pos_embed`` itself), and ``pos_embed_112.npy`` ``[1, 50, 192]``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

SEED = 0
SPLIT_INDEX = 3


def generate(out_dir: str) -> None:
    import safetensors.torch
    import timm
    import torch
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(SEED)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn_like(p))
            if name.endswith("attn.qkv.weight"):
                p.mul_(2.0)  # peaked attention, so CLS scores differ clearly between tokens
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(out_dir, "deit_tiny.safetensors"))

    rng = np.random.default_rng(SEED)
    images = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
    captured = {}
    block = model.blocks[SPLIT_INDEX - 1].attn
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
        # The non-fused path materialises the softmax; attn_drop (identity in eval) sees it.
        block.fused_attn = False
        hook = block.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
        model(torch.from_numpy(images).permute(0, 3, 1, 2))
        hook.remove()
    np.save(os.path.join(out_dir, "images.npy"), images)
    np.save(os.path.join(out_dir, "logits.npy"), logits.numpy())
    np.save(os.path.join(out_dir, "scores_split3.npy"), captured["a"][:, :, 0].mean(1).numpy())

    # timm's own path for another resolution: checkpoint_filter_fn resamples pos_embed.
    small = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=112).eval()
    small.load_state_dict(checkpoint_filter_fn(dict(state), small))
    images_112 = rng.standard_normal((2, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        logits_112 = small(torch.from_numpy(images_112).permute(0, 3, 1, 2))
    np.save(os.path.join(out_dir, "images_112.npy"), images_112)
    np.save(os.path.join(out_dir, "logits_112.npy"), logits_112.numpy())
    np.save(os.path.join(out_dir, "pos_embed_112.npy"), small.pos_embed.detach().numpy())


if __name__ == "__main__":
    generate(sys.argv[1])
