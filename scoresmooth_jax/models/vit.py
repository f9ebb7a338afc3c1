"""Vision Transformer classifiers (Flax Linen) that compute the functions of timm's and Hugging Face's ViTs.

``VisionTransformer`` is the pre-norm ViT of Dosovitskiy et al. as timm's ``VisionTransformer`` and Hugging Face's
``ViTForImageClassification`` build it: a strided patch convolution, an optional class token, learned absolute
position embeddings, ``depth`` blocks x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)), then the class token
after a final LayerNorm (``global_pool="token"``) or the mean of the patch tokens through ``fc_norm``
(``global_pool="avg"``), and a linear head. The blocks (``Block``, ``Attention``, ``Mlp``) are shared with
``models.beit``: BEiT's relative position bias is an option of ``Attention``.

Promises:
  * ``module.apply({"params": p}, x, train=False)`` takes NHWC images that are ALREADY normalised (the classifier
    wrapper normalises) and returns logits [B, num_classes] in ``dtype``. Height and width must be multiples of
    ``patch_size``; the position embedding's length is fixed by the image size the parameters were made for.
  * In float32 it computes the upstream function up to float rounding: exact (erf) GELU unless
    ``gelu_approximate`` (Hugging Face's "gelu_new"), LayerNorm with ``layer_norm_eps`` (timm 1e-6, Hugging Face
    1e-12) and E[(x - mean)^2] variance as PyTorch, softmax attention with scale head_dim^-1/2.
  * ``dtype`` is the compute dtype; parameters stay float32, LayerNorm statistics and the attention softmax are
    computed in float32.
  * Parameter names are this package's own (``patch_embed``, ``cls_token``, ``pos_embed``, ``block_<i>/{norm1,
    attn/{qkv,proj}, ls1, norm2, mlp/{fc1,fc2}, ls2}``, ``norm`` or ``fc_norm``, ``head``);
    ``modelio.convert_vit`` maps timm's and Hugging Face's state-dict keys onto them.
  * ``train`` is accepted for the classifier interface and ignored: there is no dropout or batch statistic, so
    training-mode and inference-mode functions are the same.

Upstream (huggingface/pytorch-image-models ``timm/models/vision_transformer.py``, huggingface/transformers
``models/vit/modeling_vit.py``, Apache-2.0) was read to learn the architectures; this is an independent
implementation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GLOBAL_POOLS = ("token", "avg")
# The attention's input-projection biases: one bias over q, k and v (timm ViT, Hugging Face), q and v only with k's
# fixed at zero (BEiT), or none.
QKV_BIASES = ("qkv", "qv", "none")
TIMM_LAYER_NORM_EPS = 1e-6

weight_init = nn.initializers.truncated_normal(0.02)


def layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it, not E[x^2] - mean^2, which loses digits on the
  # large-mean residual streams of deep transformers. Flax keeps the statistics in float32 whatever ``dtype``.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class Mlp(nn.Module):
  """fc2(GELU(fc1(x))): the transformer block's feed-forward network."""

  hidden_dim: int
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=weight_init, name="fc1")(x)
    h = jax.nn.gelu(h, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=weight_init, name="fc2")(h)


def num_relative_distances(rows: int, columns: int) -> int:
  """Entries of a relative position bias table (BEiT): every patch offset, plus three for the class token."""
  return (2 * rows - 1) * (2 * columns - 1) + 3


def relative_position_index(rows: int, columns: int) -> np.ndarray:
  """[1 + rows * columns]^2 int32: the bias-table row of each (query, key) token pair, class token first (BEiT).

  Patch pairs index their offset (dr, dc), shifted to start at 0, as (dr + rows - 1) * (2 columns - 1) +
  (dc + columns - 1); the table's last three rows are class -> patch (the query is the class token),
  patch -> class and class -> class.
  """
  r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
  r, c = r.reshape(-1), c.reshape(-1)
  offsets = (r[:, None] - r[None, :] + rows - 1) * (2 * columns - 1) + (c[:, None] - c[None, :] + columns - 1)
  size = num_relative_distances(rows, columns)
  index = np.empty((rows * columns + 1,) * 2, np.int32)
  index[1:, 1:] = offsets
  index[0, :] = size - 3
  index[:, 0] = size - 2
  index[0, 0] = size - 1
  return index


class Attention(nn.Module):
  """Multi-head self-attention with one fused q/k/v projection.

  ``qkv_bias`` (``QKV_BIASES``): "qkv" is the bias of the fused projection (``qkv/bias``), "qv" two parameters
  ``q_bias`` and ``v_bias`` with the keys unbiased (BEiT), "none" no bias. ``rel_pos_grid`` (rows, columns) of
  patches adds BEiT's learned relative position bias (``relative_position_bias_table`` [entries, heads]) to the
  scaled logits; the tokens are then the class token and that grid of patches.
  """

  num_heads: int
  qkv_bias: str = "qkv"
  rel_pos_grid: tuple[int, int] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.qkv_bias not in QKV_BIASES:
      raise ValueError(f"qkv_bias={self.qkv_bias!r}: choose one of {QKV_BIASES}.")
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias == "qkv", dtype=self.dtype, kernel_init=weight_init, name="qkv")(x)
    if self.qkv_bias == "qv":
      q_bias = self.param("q_bias", nn.initializers.zeros, (d,))
      v_bias = self.param("v_bias", nn.initializers.zeros, (d,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    # The fused projection's outputs are ordered (q|k|v, head, channel), as upstream reshapes them.
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q * jnp.asarray(head_dim ** -0.5, q.dtype), k).astype(jnp.float32)
    if self.rel_pos_grid is not None:
      table = self.param("relative_position_bias_table", nn.initializers.zeros,
                         (num_relative_distances(*self.rel_pos_grid), self.num_heads))
      bias = table[relative_position_index(*self.rel_pos_grid)]  # [query, key, head]
      logits = logits + jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=weight_init, name="proj")(out)


class Block(nn.Module):
  """x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)); ``layer_scale`` adds the per-channel ls1, ls2;
  ``rel_pos_grid`` gives the attention BEiT's relative position bias."""

  num_heads: int
  mlp_dim: int
  qkv_bias: str = "qkv"
  layer_scale: bool = False
  layer_norm_eps: float = TIMM_LAYER_NORM_EPS
  gelu_approximate: bool = False
  rel_pos_grid: tuple[int, int] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = Attention(self.num_heads, self.qkv_bias, self.rel_pos_grid, self.dtype, name="attn")(
        layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x))
    if self.layer_scale:
      h = h * self.param("ls1", nn.initializers.constant(1e-5), (d,)).astype(h.dtype)
    x = x + h
    h = Mlp(self.mlp_dim, self.gelu_approximate, self.dtype, name="mlp")(
        layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x))
    if self.layer_scale:
      h = h * self.param("ls2", nn.initializers.constant(1e-5), (d,)).astype(h.dtype)
    return x + h


def patch_grid(image_hw, patch_size: int) -> tuple[int, int]:
  """(rows, columns) of patches; an image size that is not a multiple of the patch size fails naming both."""
  h, w = (int(s) for s in image_hw)
  if h % patch_size or w % patch_size:
    raise ValueError(f"images of {h} x {w} pixels do not split into {patch_size} x {patch_size} patches; resize "
                     f"them to a multiple of {patch_size} (the classifier's own input size).")
  return h // patch_size, w // patch_size


def embed_patches(x, embed_dim: int, patch_size: int, dtype: Any) -> jax.Array:
  """NHWC images -> patch tokens [B, rows * columns, embed_dim], row-major as upstream flattens them."""
  patch_grid(x.shape[1:3], patch_size)
  tokens = nn.Conv(embed_dim, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
                   dtype=dtype, kernel_init=weight_init, name="patch_embed")(x)
  return tokens.reshape(x.shape[0], -1, embed_dim)


def prepend_class_token(module: nn.Module, tokens) -> jax.Array:
  cls = module.param("cls_token", weight_init, (1, 1, tokens.shape[-1])).astype(tokens.dtype)
  return jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, tokens.shape[-1])), tokens], axis=1)


def pool_and_classify(module: nn.Module, x, num_prefix_tokens: int, global_pool: str, fc_norm: bool,
                      eps: float, num_classes: int, dtype: Any) -> jax.Array:
  """The head shared with BEiT: final LayerNorm ``norm`` on every token unless ``fc_norm``; the class token or the
  mean of the patch tokens; ``fc_norm`` on the pooled features; the linear ``head``."""
  if not fc_norm:
    x = layer_norm(eps, dtype, "norm")(x)
  pooled = x[:, 0] if global_pool == "token" else jnp.mean(x[:, num_prefix_tokens:], axis=1)
  if fc_norm:
    pooled = layer_norm(eps, dtype, "fc_norm")(pooled)
  return nn.Dense(num_classes, dtype=dtype, kernel_init=nn.initializers.zeros, name="head")(pooled)


def check_options(global_pool: str, class_token: bool) -> None:
  if global_pool not in GLOBAL_POOLS:
    raise ValueError(f"global_pool={global_pool!r}: choose one of {GLOBAL_POOLS}.")
  if global_pool == "token" and not class_token:
    raise ValueError("global_pool='token' pools the class token, but class_token=False; use global_pool='avg'.")


class VisionTransformer(nn.Module):
  """timm's ``VisionTransformer`` / Hugging Face's ``ViTForImageClassification`` (module docstring).

  Attributes:
    num_classes: number of logits.
    patch_size: side of the square patches (16 for ViT-B/16).
    embed_dim, depth, num_heads: width, number of blocks, attention heads (embed_dim divisible by num_heads).
    mlp_dim: hidden width of the MLPs (timm: mlp_ratio * embed_dim; Hugging Face: intermediate_size).
    qkv_bias: whether the fused q/k/v projection has a bias.
    class_token: prepend a learned class token (position embeddings then cover it too).
    global_pool: "token" (the class token) or "avg" (the mean of the patch tokens).
    fc_norm: the final LayerNorm after pooling (``fc_norm``) instead of before it on every token (``norm``);
      None: as timm decides, after pooling exactly when global_pool="avg".
    layer_scale: per-channel learned scales on both residual branches (timm's ``init_values``).
    layer_norm_eps: 1e-6 for timm, 1e-12 for Hugging Face ViTs.
    gelu_approximate: the tanh approximation of GELU (Hugging Face "gelu_new"/"gelu_pytorch_tanh").
    dtype: compute dtype.
  """

  num_classes: int
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = True
  class_token: bool = True
  global_pool: str = "token"
  fc_norm: bool | None = None
  layer_scale: bool = False
  layer_norm_eps: float = TIMM_LAYER_NORM_EPS
  gelu_approximate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no batch statistics: one function in both modes
    check_options(self.global_pool, self.class_token)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    tokens = embed_patches(x.astype(self.dtype), self.embed_dim, self.patch_size, self.dtype)
    if self.class_token:
      tokens = prepend_class_token(self, tokens)
    pos = self.param("pos_embed", weight_init, (1, tokens.shape[1], self.embed_dim))
    tokens = tokens + pos.astype(tokens.dtype)
    for i in range(self.depth):
      tokens = Block(self.num_heads, self.mlp_dim, "qkv" if self.qkv_bias else "none", self.layer_scale,
                     self.layer_norm_eps, self.gelu_approximate, dtype=self.dtype, name=f"block_{i}")(tokens)
    fc_norm = self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)
    return pool_and_classify(self, tokens, int(self.class_token), self.global_pool, fc_norm, self.layer_norm_eps,
                             self.num_classes, self.dtype)


def num_params(module: nn.Module, image_shape) -> int:
  """Number of parameters of ``module`` for (H, W, C) images, from ``jax.eval_shape`` (nothing is allocated)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))
