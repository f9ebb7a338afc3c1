"""NCSN++ / DDPM++ (Song et al. 2021), a Flax Linen network that loads score_sde's published checkpoints.

What this module promises:
  * ``NCSNpp(**settings).init(...)`` builds a parameter tree with exactly the names and shapes of
    yang-song/score_sde's ``models/ncsnpp.py`` for the same settings (the settings are score_sde's
    ``config.model`` keys, plus ``centered`` = ``config.data.centered``), so a score_sde checkpoint's
    parameters apply to it unchanged. Parameter names are made by Linen from class names and creation
    order; that is why the sub-modules below keep score_sde's class names (``ResnetBlockBigGANpp``,
    ``AttnBlockpp``, ``NIN``, ``Conv2d``, ...) and are created in score_sde's order. The names are part of
    the checkpoint format, not a style choice.
  * With those parameters it computes the same function (checked to 1e-4 against score_sde's own output in
    tests/test_ncsnpp.py, on the parity fixture ``ncsnpp_small_parity.npz``).

Call: ``module.apply({"params": p}, x, cond)`` with ``x`` NHWC and ``cond`` one value per example ([B]):
  * VE models (``embedding_type="fourier"``, ``scale_by_sigma=True``, ``centered=False``: NCSN++ continuous):
    ``x`` is a batch of images in [0, 1] plus Gaussian noise, ``cond`` is its standard deviation sigma in
    those same [0, 1] units, and the output is the score grad_x log p_sigma(x). score_sde trains VE models on
    uncentred data (``datasets.get_data_scaler`` is the identity when ``data.centered=False``) and perturbs
    them as x + sigma z, so its sigma is our sigma; the network maps [0, 1] to [-1, 1] itself, embeds
    log sigma with Gaussian Fourier features and divides its last layer by sigma.
  * VP models (``embedding_type="positional"``, ``centered=True``: DDPM++ continuous): ``x`` is the VP-diffused
    image x_t on the [-1, 1] scale, ``cond`` is the time label score_sde feeds the network (999 t for
    continuous VP training), and the output is the noise prediction eps. ``scoresmooth_jax.modelio.pretrained``
    turns such a network into a score on [0, 1] images at our sigma.

Supported settings: everything score_sde's NCSN++ class accepts except ``scale_by_sigma`` with a positional
embedding (score_sde's discrete-sigma VE models, which index a fixed table of sigmas). ``dropout`` acts only
with ``train=True`` (then it needs a ``"dropout"`` rng); ``init_scale`` only affects initialisation.
``dtype`` (not a score_sde setting; float32 by default) is the compute dtype: with bfloat16 the parameters stay
float32 (cast where used), the conditioning embedding's features, GroupNorm statistics and attention softmax stay
float32, and the output is float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax.models.ncsnpp_layers import (
    ACTIVATIONS, AttnBlockpp, Combine, Downsample, GaussianFourierProjection, ResnetBlockBigGANpp, ResnetBlockDDPMpp,
    Upsample, _SQRT2, _conv, _num_groups, default_init, timestep_embedding)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"NCSNpp({name}={value!r}): choose one of {choices}.")


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net. Attributes are score_sde's ``config.model`` settings (``centered`` is
  ``config.data.centered``); defaults are the CIFAR-10 NCSN++ continuous VE configuration.

  ``__call__(x, cond, train=False)``: see the module docstring for what ``cond`` and the output mean for VE
  and VP models. ``x``: [B, H, W, C] with H = W divisible by 2^(len(ch_mult) - 1); ``cond``: [B].
  """

  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "residual"
  progressive_combine: str = "sum"
  init_scale: float = 0.0
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0
  scale_by_sigma: bool = True
  centered: bool = False
  nonlinearity: str = "swish"
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_choice("resblock_type", self.resblock_type, ("biggan", "ddpm"))
    _check_choice("progressive", self.progressive, ("none", "output_skip", "residual"))
    _check_choice("progressive_input", self.progressive_input, ("none", "input_skip", "residual"))
    _check_choice("progressive_combine", self.progressive_combine, ("sum", "cat"))
    _check_choice("embedding_type", self.embedding_type, ("fourier", "positional"))
    _check_choice("nonlinearity", self.nonlinearity, tuple(ACTIVATIONS))
    if self.scale_by_sigma and self.embedding_type == "positional":
      raise ValueError("NCSNpp(scale_by_sigma=True, embedding_type='positional') is score_sde's discrete-sigma "
                       "VE model, which is not supported: use embedding_type='fourier' (continuous VE) or "
                       "scale_by_sigma=False (VP).")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4 or cond.shape != (x.shape[0],):
      raise ValueError(f"NCSNpp expects x [B, H, W, C] and one conditioning value per example [B]; got x "
                       f"{x.shape} and cond {cond.shape}.")
    act = ACTIVATIONS[self.nonlinearity]
    nf = self.nf
    num_levels = len(self.ch_mult)
    if x.shape[1] % 2 ** (num_levels - 1) or x.shape[2] % 2 ** (num_levels - 1):
      raise ValueError(f"NCSNpp with {num_levels} levels needs H and W divisible by {2 ** (num_levels - 1)}; "
                       f"got images of shape {x.shape[1:]}.")
    cond = cond.astype(x.dtype)

    if self.embedding_type == "fourier":
      temb = GaussianFourierProjection(embedding_size=nf, scale=self.fourier_scale)(jnp.log(cond))
    else:
      temb = timestep_embedding(cond, nf)
    dtype = self.dtype
    if self.conditional:
      temb = nn.Dense(nf * 4, kernel_init=default_init(), dtype=dtype)(temb)
      temb = nn.Dense(nf * 4, kernel_init=default_init(), dtype=dtype)(act(temb))
    else:
      temb = None

    def resnet_block(**kwargs):
      if self.resblock_type == "biggan":
        return ResnetBlockBigGANpp(act=act, dropout=self.dropout, fir=self.fir, fir_kernel=self.fir_kernel,
                                   init_scale=self.init_scale, skip_rescale=self.skip_rescale, dtype=dtype,
                                   **kwargs)
      return ResnetBlockDDPMpp(act=act, dropout=self.dropout, init_scale=self.init_scale,
                               skip_rescale=self.skip_rescale, dtype=dtype, **kwargs)

    def attn_block():
      return AttnBlockpp(init_scale=self.init_scale, skip_rescale=self.skip_rescale, dtype=dtype)

    def norm_act(h):
      return act(nn.GroupNorm(num_groups=_num_groups(h.shape[-1]), dtype=dtype)(h))

    resample = dict(fir=self.fir, fir_kernel=self.fir_kernel, dtype=dtype)
    channels = x.shape[-1]
    if not self.centered:
      x = 2 * x - 1  # the network works on [-1, 1]
    # From here on in the compute dtype: Conv2d, NIN and the FIR filters follow their input's dtype.
    x = x.astype(dtype)

    # Encoder. ``skips`` keeps every intermediate feature map for the decoder's concatenations.
    pyramid_in = x if self.progressive_input != "none" else None
    skips = [_conv(x, nf, 3, dtype=dtype)]
    for level in range(num_levels):
      for _ in range(self.num_res_blocks):
        h = resnet_block(out_ch=nf * self.ch_mult[level])(skips[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block()(h)
        skips.append(h)
      if level != num_levels - 1:
        if self.resblock_type == "ddpm":
          h = Downsample(with_conv=self.resamp_with_conv, **resample)(skips[-1])
        else:
          h = resnet_block(down=True)(skips[-1], temb, train)
        if self.progressive_input == "input_skip":
          pyramid_in = Downsample(with_conv=False, **resample)(pyramid_in)
          h = Combine(method=self.progressive_combine, dtype=dtype)(pyramid_in, h)
        elif self.progressive_input == "residual":
          pyramid_in = Downsample(out_ch=h.shape[-1], with_conv=True, **resample)(pyramid_in)
          pyramid_in = (pyramid_in + h) / _SQRT2 if self.skip_rescale else pyramid_in + h
          h = pyramid_in
        skips.append(h)

    h = skips[-1]
    h = resnet_block()(h, temb, train)
    h = attn_block()(h)
    h = resnet_block()(h, temb, train)

    # Decoder.
    pyramid = None
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = resnet_block(out_ch=nf * self.ch_mult[level])(jnp.concatenate([h, skips.pop()], axis=-1), temb,
                                                          train)
      if h.shape[1] in self.attn_resolutions:
        h = attn_block()(h)

      if self.progressive == "output_skip":
        out = _conv(norm_act(h), channels, 3, init_scale=self.init_scale, dtype=dtype)
        pyramid = out if level == num_levels - 1 else Upsample(with_conv=False, **resample)(pyramid) + out
      elif self.progressive == "residual":
        if level == num_levels - 1:
          pyramid = _conv(norm_act(h), h.shape[-1], 3, dtype=dtype)
        else:
          pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, **resample)(pyramid)
          pyramid = (pyramid + h) / _SQRT2 if self.skip_rescale else pyramid + h
          h = pyramid

      if level != 0:
        if self.resblock_type == "ddpm":
          h = Upsample(with_conv=self.resamp_with_conv, **resample)(h)
        else:
          h = resnet_block(up=True)(h, temb, train)
    assert not skips, "every encoder feature map is consumed by the decoder"

    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = _conv(norm_act(h), channels, 3, init_scale=self.init_scale, dtype=dtype)

    h = h.astype(jnp.float32)
    if self.scale_by_sigma:
      h = h / cond.reshape((-1,) + (1,) * (h.ndim - 1))  # fourier embedding: cond is sigma
    return h


def num_params(params: Any) -> int:
  """Total number of scalars in a parameter tree."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
