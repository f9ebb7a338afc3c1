"""Score models shipped inside the package: the file format round trip and the real CIFAR-10 model's PSNR."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import models
from scoresmooth_jax.datasets import data
from scoresmooth_jax.modelio import checkpoint, export
from scoresmooth_jax.training import evaluate
from scoresmooth_jax.modelio import score_models

SHIPPED = "cifar10-cpu"


def test_ship_and_load_round_trip(tmp_path, monkeypatch):
  kwargs = dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), max_groups=4)
  module = models.get_model("score_unet", **kwargs)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  online = jax.tree.map(lambda a: a + 1.0, params)  # the raw parameters must not be shipped
  export.export_score_model(tmp_path / "export", "score_unet", kwargs, params, online, (8, 8, 3), 0.01, 1.0)
  shipped = tmp_path / "shipped"
  npz = export.ship_score_model(tmp_path / "export", "tiny-test", {"data": "none"}, out_dir=shipped)
  monkeypatch.setattr(export, "shipped_dir", lambda: shipped)
  assert export.shipped_names() == ["tiny-test"]
  loaded = export.load_score_fn("tiny-test")
  x, sigma = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3)), jnp.array([0.1, 0.5])
  np.testing.assert_array_equal(loaded(x, sigma), module.apply({"params": params}, x, sigma))
  assert loaded.metadata["model_card"] == {"data": "none"} and (loaded.sigma_min, loaded.sigma_max) == (0.01, 1.0)
  with np.load(npz) as arrays:
    assert sum(a.size for a in arrays.values()) == sum(a.size for a in jax.tree.leaves(params))
  with pytest.raises(checkpoint.CheckpointError, match="use_ema=True"):
    export.load_score_fn("tiny-test", use_ema=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"not the name of a shipped model either \(shipped: "
                     r"\['tiny-test'\]\)"):
    export.load_score_fn("no-such-model")


def test_a_card_psnr_table_is_reused_only_for_the_setup_it_was_measured_with(tmp_path, monkeypatch):
  kwargs = dict(channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(), max_groups=4)
  module = models.get_model("score_unet", **kwargs)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  export.export_score_model(tmp_path / "export", "score_unet", kwargs, params, params, (8, 8, 3), 0.01, 1.0)
  images = np.asarray(jax.random.uniform(jax.random.key(1), (6, 8, 8, 3)))
  sigmas = [0.25, 0.5]
  package_card = export.load_score_fn(SHIPPED).metadata  # shipped before cards recorded their setup
  shipped = tmp_path / "shipped"
  monkeypatch.setattr(export, "shipped_dir", lambda: shipped)
  export.ship_score_model(tmp_path / "export", "tiny", {}, out_dir=shipped, store_dtype="float16")
  table = evaluate.denoising_psnr(export.load_score_fn("tiny"), images, sigmas, jax.random.key(0))
  setup = evaluate.psnr_setup("fixtures/test.npz", len(images), sigmas, 0)
  card = {"psnr_db": {f"{s:g}": v for s, v in table.items()}, "psnr_setup": setup}
  export.ship_score_model(tmp_path / "export", "tiny", card, out_dir=shipped, store_dtype="float16")
  loaded = export.load_score_fn("tiny")
  # What the reuse stands in for: measuring the same table again gives exactly the card's.
  again = evaluate.denoising_psnr(loaded, images, sigmas, jax.random.key(0))
  assert evaluate.card_psnr_table(loaded.metadata, evaluate.psnr_setup("test.npz", 6, sigmas, 0)) == again
  for other in (evaluate.psnr_setup("test.npz", 5, sigmas, 0), evaluate.psnr_setup("test.npz", 6, sigmas[::-1], 0),
                evaluate.psnr_setup("test.npz", 6, sigmas, 1), evaluate.psnr_setup("other.npz", 6, sigmas, 0)):
    assert evaluate.card_psnr_table(loaded.metadata, other) is None
  assert evaluate.card_psnr_table(package_card, setup) is None


def test_ship_in_float16_halves_the_file_and_loads_as_float32(tmp_path, monkeypatch):
  kwargs = dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), max_groups=4)
  module = models.get_model("score_unet", **kwargs)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))["params"]
  export.export_score_model(tmp_path / "export", "score_unet", kwargs, params, params, (8, 8, 3), 0.01, 1.0)
  shipped = tmp_path / "shipped"
  full = export.ship_score_model(tmp_path / "export", "full", {}, out_dir=shipped)
  half = export.ship_score_model(tmp_path / "export", "half", {}, out_dir=shipped, store_dtype="float16")
  assert half.stat().st_size < 0.6 * full.stat().st_size
  monkeypatch.setattr(export, "shipped_dir", lambda: shipped)
  loaded = export.load_score_fn("half")
  assert loaded.metadata["stored_dtype"] == "float16"
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(loaded.params))
  # Exactly the float16 rounding of every parameter, nothing else.
  rounded = jax.tree.map(lambda a: jnp.asarray(a, jnp.float16).astype(jnp.float32), params)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, rounded)
  with pytest.raises(ValueError, match="store_dtype='bfloat16'"):
    export.ship_score_model(tmp_path / "export", "bad", {}, out_dir=shipped, store_dtype="bfloat16")


# The largest file each shipped model may be: the CPU model stays small; any other (`cifar10`) at most 16 MiB.
MAX_MIB = {SHIPPED: 5}


@pytest.mark.parametrize("name", export.shipped_names())
def test_every_shipped_model_reproduces_its_card(fixtures_dir, name):
  """Guards the file and the loader: one-step PSNR on 64 real test images at sigma 0.25, as the card says."""
  assert SHIPPED in export.shipped_names()
  assert (export.shipped_dir() / f"{name}.npz").stat().st_size <= MAX_MIB.get(name, 16) * 2**20
  score_fn = score_models.load_score(name)  # the job's loader and export.load_score_fn agree on short names
  card = score_fn.metadata["model_card"]
  check = card["ci_check"]
  images = data.get_source(f"npz:{fixtures_dir / 'cifar10_test_first1017.npz'}", "test").get_batch(
      np.arange(check["num_images"]))[0]
  got = evaluate.denoising_psnr(score_fn, images, [check["sigma"]], jax.random.key(check["seed"]),
                                annealed=False)[check["sigma"]]
  assert abs(got["one_step"] - check["one_step_psnr"]) <= 0.3, (got, check)
  assert got["one_step"] > got["noisy"] + 10.0  # a denoiser, not the identity
  assert json.loads((export.shipped_dir() / f"{name}.json").read_text())["kind"] == "score"
