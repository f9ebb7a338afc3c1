"""BEiT classifiers (Flax Linen) that compute the function of timm's ``Beit`` (``beit_*``, ``beitv2_*``).

BEiT is the ViT of ``models.vit`` with three differences, all options of its blocks: every attention adds a learned
relative position bias (a table of (2 rows - 1)(2 columns - 1) + 3 entries per head, indexed by the offset between
two patches, with three extra entries for class-to-patch, patch-to-class and class-to-class), the q/k/v
projection has biases on q and v only, and both residual branches have per-channel layer scales (``gamma_1``,
``gamma_2`` upstream). The class token is always there; absolute position embeddings are optional (off in
every published ``beit_*``); the head pools the mean of the patch tokens through ``fc_norm`` (or the class token
through a final ``norm``).

Promises:
  * ``module.apply({"params": p}, x, train=False)``: NHWC images, already normalised, -> logits [B, num_classes]
    in ``dtype``; float32 computes timm's function up to float rounding (exact GELU, LayerNorm eps 1e-6).
  * ``relative_position_index(rows, columns)`` is timm's index (checked against a checkpoint's own
    ``relative_position_index`` buffer where one is saved); it is a constant of the image size, not a parameter.
  * Parameter names: as ``models.vit`` with ``block_<i>/attn/{q_bias, v_bias, relative_position_bias_table}``
    and ``block_<i>/{ls1, ls2}`` for timm's ``gamma_1``, ``gamma_2``; ``modelio.convert_vit`` maps timm's keys
    onto them.

Upstream (huggingface/pytorch-image-models ``timm/models/beit.py``, Apache-2.0; microsoft/unilm BEiT, MIT) was read
to learn the architecture; this is an independent implementation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from scoresmooth_jax.models import vit


# The relative position bias is an option of the shared attention; re-exported here where BEiT readers look.
num_relative_distances = vit.num_relative_distances
relative_position_index = vit.relative_position_index


class Beit(nn.Module):
  """timm's ``Beit`` (module docstring).

  Attributes:
    num_classes: number of logits.
    patch_size, embed_dim, depth, num_heads, mlp_dim: as ``vit.VisionTransformer``.
    qkv_bias: biases on q and v (timm's default True).
    use_abs_pos_emb: learned absolute position embeddings (False in every published ``beit_*``).
    use_rel_pos_bias: a relative position bias table in every block (True in every published ``beit_*``).
    layer_scale: per-channel scales on both residual branches (timm's ``init_values``; all published models).
    global_pool: "avg" (mean of patch tokens, then ``fc_norm``) or "token" (class token after ``norm``).
    dtype: compute dtype.
  """

  num_classes: int
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = True
  use_abs_pos_emb: bool = False
  use_rel_pos_bias: bool = True
  layer_scale: bool = True
  global_pool: str = "avg"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no batch statistics
    vit.check_options(self.global_pool, True)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    grid = vit.patch_grid(x.shape[1:3], self.patch_size)
    tokens = vit.prepend_class_token(self, vit.embed_patches(x.astype(self.dtype), self.embed_dim,
                                                             self.patch_size, self.dtype))
    if self.use_abs_pos_emb:
      pos = self.param("pos_embed", vit.weight_init, (1, tokens.shape[1], self.embed_dim))
      tokens = tokens + pos.astype(tokens.dtype)
    for i in range(self.depth):
      tokens = vit.Block(self.num_heads, self.mlp_dim, "qv" if self.qkv_bias else "none", self.layer_scale,
                         vit.TIMM_LAYER_NORM_EPS, rel_pos_grid=grid if self.use_rel_pos_bias else None,
                         dtype=self.dtype, name=f"block_{i}")(tokens)
    return vit.pool_and_classify(self, tokens, 1, self.global_pool, self.global_pool == "avg",
                                 vit.TIMM_LAYER_NORM_EPS, self.num_classes, self.dtype)
