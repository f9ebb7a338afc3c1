"""Shipped-model storage precisions (modelio/quantize.py) and their round trip through shipping and loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scoresmooth_jax import denoise, models
from scoresmooth_jax.modelio import checkpoint, export, quantize


def _flat(seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
  kernel[..., 2] = 0.0  # an all-zero output channel
  return {"Conv_0/kernel": kernel, "Conv_0/bias": rng.normal(size=(5,)).astype(np.float32),
          "Dense_0/kernel": rng.normal(scale=0.01, size=(7, 3)).astype(np.float32)}


def test_int8_codes_one_scale_per_output_channel_and_exact_vectors():
  flat = _flat()
  arrays = quantize.encode(flat, "int8")
  assert sorted(arrays) == sorted([*flat, "Conv_0/kernel:int8_scale", "Dense_0/kernel:int8_scale"])
  for key in ("Conv_0/kernel", "Dense_0/kernel"):
    w, codes, scale = flat[key], arrays[key], arrays[key + quantize.SCALE_SUFFIX]
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (w.shape[-1],)
    peak = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0)
    np.testing.assert_allclose(scale[peak > 0], peak[peak > 0] / 127, rtol=1e-7)
    assert np.abs(codes).max() == 127 and codes.min() >= -127  # each nonzero channel's peak maps to +-127
    back = quantize.decode(arrays)[key]
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-6))  # at most half a step per weight
  assert np.all(quantize.decode(arrays)["Conv_0/kernel"][..., 2] == 0)
  np.testing.assert_array_equal(quantize.decode(arrays)["Conv_0/bias"], flat["Conv_0/bias"])  # vectors exact
  assert quantize.stored_dtype(arrays) == "int8"


def test_float_precisions_round_trip_to_float32():
  flat = _flat()
  for store_dtype, dtype in (("float32", np.float32), ("float16", np.float16)):
    arrays = quantize.encode(flat, store_dtype)
    assert {a.dtype for a in arrays.values()} == {np.dtype(dtype)} and quantize.stored_dtype(arrays) == store_dtype
    back = quantize.dequantized(flat, store_dtype)
    for key, w in flat.items():
      assert back[key].dtype == np.float32
      np.testing.assert_array_equal(back[key], w.astype(dtype).astype(np.float32))


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="store_dtype='int4'"):
    quantize.encode(_flat(), "int4")
  with pytest.raises(ValueError, match="reserve for scales"):
    quantize.encode({"a:int8_scale": np.ones((2, 2))}, "float16")
  arrays = quantize.encode(_flat(), "int8")
  del arrays["Dense_0/kernel:int8_scale"]
  with pytest.raises(ValueError, match="'Dense_0/kernel:int8_scale' is missing"):
    quantize.decode(arrays)


def test_file_size_bound_and_the_most_precise_fitting_storage(tmp_path):
  flat = {f"layer_{i}/kernel": np.ones((3, 3, 32, 32), np.float32) for i in range(4)}
  sizes = {}
  for store_dtype in quantize.STORE_DTYPES:
    np.savez(tmp_path / f"{store_dtype}.npz", **quantize.encode(flat, store_dtype))
    sizes[store_dtype] = (tmp_path / f"{store_dtype}.npz").stat().st_size
    bound = quantize.file_bytes(flat, store_dtype)
    assert sizes[store_dtype] <= bound < sizes[store_dtype] + 2048  # an upper bound, and a tight one
  assert sizes["int8"] < 0.3 * sizes["float32"] and sizes["float16"] < 0.52 * sizes["float32"]
  assert quantize.smallest_fitting(flat, quantize.file_bytes(flat, "float32")) == "float32"
  assert quantize.smallest_fitting(flat, quantize.file_bytes(flat, "float32") - 1) == "float16"
  assert quantize.smallest_fitting(flat, quantize.file_bytes(flat, "float16") - 1) == "int8"
  with pytest.raises(ValueError, match="even as int8"):
    quantize.smallest_fitting(flat, quantize.file_bytes(flat, "int8") - 1)


def _export(tmp_path):
  kwargs = dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), max_groups=4)
  module = models.get_model("score_unet", **kwargs)

  # Random trained-like weights from numpy, shaped by tracing alone: compiling Flax's initialisers takes XLA:CPU
  # most of a minute, and their zero last convolutions would make the checks trivial.
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(scale=0.2, size=a.shape).astype(np.float32), shapes)
  export.export_score_model(tmp_path / "export", "score_unet", kwargs, params, params, (8, 8, 3), 0.01, 1.0)
  return module, params


def test_int8_ship_and_load_round_trip_gives_the_stored_weights_dequantized(tmp_path, monkeypatch):
  module, params = _export(tmp_path)
  shipped = tmp_path / "shipped"
  npz = export.ship_score_model(tmp_path / "export", "tiny-int8", {"data": "none"}, out_dir=shipped,
                                store_dtype="int8")
  full = export.ship_score_model(tmp_path / "export", "tiny-f32", {}, out_dir=shipped)
  assert npz.stat().st_size < 0.5 * full.stat().st_size  # not 0.25: the headers of small arrays weigh
  # The stored weights dequantized by hand, from the file: codes times their channel's scale.
  with np.load(npz) as arrays:
    stored = {k: arrays[k] for k in arrays.files}
  by_hand = {k: (v.astype(np.float32) * stored[k + ":int8_scale"] if v.dtype == np.int8 else v)
             for k, v in stored.items() if not k.endswith(":int8_scale")}
  by_hand = traverse_util.unflatten_dict(by_hand, sep="/")
  one_step = jax.jit(lambda p, y: denoise.one_step(lambda x, s: module.apply({"params": p}, x, s), y,
                                                   jnp.full((y.shape[0],), 0.25)))
  y = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  expected = one_step(by_hand, y)
  monkeypatch.setattr(export, "shipped_dir", lambda: shipped)
  for spec in ("tiny-int8", str(npz)):  # by name from the package folder, or by the file's path
    loaded = export.load_score_fn(spec)
    assert loaded.metadata["stored_dtype"] == "int8" and loaded.metadata["model_card"] == {"data": "none"}
    jax.tree.map(np.testing.assert_array_equal, loaded.params, by_hand)  # float32, exactly the dequantized file
    np.testing.assert_array_equal(one_step(loaded.params, y), expected)
    np.testing.assert_allclose(jax.jit(lambda x: denoise.one_step(loaded, x, 0.25))(y), expected, atol=1e-6)
  # int8 really rounds: the full-precision network denoises differently.
  assert not np.allclose(one_step(params, y), expected, rtol=0, atol=1e-6)
  assert json.loads(npz.with_suffix(".json").read_text())["kind"] == "score"


def test_a_name_not_shipped_yet_says_so(tmp_path, monkeypatch):
  monkeypatch.setattr(export, "shipped_dir", lambda: tmp_path)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match="'cifar10' .* is not shipped in this version of the package "
                     "yet: use 'cifar10-cpu'"):
    export.load_score_fn("cifar10")
