"""configs/score_cifar10.py:gpu (the network shipped as `cifar10`): bfloat16 mixed precision, its size against the
16 MiB limit, and the rate probe's choice of width (training/rate_probe.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scoresmooth_jax.modelio import checkpoint, export, quantize
from scoresmooth_jax.runtime import configs_util
from scoresmooth_jax.training import rate_probe, train, train_state


def load_config(variant, **overrides):
  return configs_util.load_config("configs/score_cifar10.py", variant, **overrides)


def _param_shapes(config):
  return jax.eval_shape(train.build_task(config).init_variables, jax.random.key(0))["params"]


def test_gpu_network_fits_16_mib_only_as_int8_and_trains_like_accel():
  config = load_config("gpu")
  accel = load_config("accel")
  flat = traverse_util.flatten_dict(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), _param_shapes(config)),
                                    sep="/")
  limit = 16 * 2**20
  assert quantize.file_bytes(flat, "float16") > limit >= quantize.file_bytes(flat, "int8")
  assert quantize.smallest_fitting(flat, limit) == "int8"
  assert config.model.kwargs.dtype == "bfloat16" and config.train.batch_size >= 128
  assert (config.sigma.focus_min, config.sigma.focus_prob) == (accel.sigma.focus_min, accel.sigma.focus_prob)
  assert config.data.in_memory and config.eval.num_examples == 1017
  # The tiny variant is the same network, narrower, on toy batches.
  tiny = load_config("gpu_tiny")
  for key in ("channel_mults", "num_res_blocks", "attention_resolutions", "dtype"):
    assert tiny.model.kwargs[key] == config.model.kwargs[key]


def test_mixed_precision_computes_in_bfloat16_and_keeps_every_state_array_float32():
  config = load_config("gpu_tiny")
  task = train.build_task(config)
  optimizer = train_state.make_optimizer(train_state.OptimConfig(**config.optim.to_dict()), config.train.num_steps)
  state = jax.eval_shape(lambda k: train_state.create_state(task.init_variables(k), optimizer), jax.random.key(0))
  k, batch = config.train.steps_per_dispatch, config.train.batch_size
  images = jax.ShapeDtypeStruct((k, batch, 32, 32, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((k, batch), jnp.int32)
  step = train_state.get_train_step_fn(task.loss_fn, optimizer, config.optim.ema_decay)
  new_state, metrics = jax.eval_shape(step, state, images, labels, jax.random.key(1))
  for tree in (state, new_state):
    floats = [a.dtype for a in jax.tree.leaves((tree.params, tree.ema_params, tree.opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  # The convolutions of the training step run in bfloat16 (the evaluation network in float32).
  jaxpr = str(jax.make_jaxpr(step)(state, images, labels, jax.random.key(1)))
  assert "conv_general_dilated" in jaxpr and "bf16[" in jaxpr
  assert task.model_kwargs == {k: v for k, v in config.model.kwargs.to_dict().items() if k != "dtype"}


def test_an_unknown_training_compute_dtype_fails_before_training():
  with pytest.raises(ValueError, match=r"model.kwargs.dtype='float16': choose one of \('float32', 'bfloat16'\)"):
    train.build_task(load_config("gpu_tiny", model__kwargs__dtype="float16"))


@pytest.mark.slow
def test_gpu_tiny_trains_in_bfloat16_with_a_float32_ema_and_exports_a_float32_network(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  for name in ("airplane", "truck"):
    (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          tmp_path / "imgs" / "train" / name / f"{i}.jpg")
  np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels=np.zeros(8, int))
  # One step per dispatch: the same network and precision, without the loop XLA:CPU compiles slowly.
  config = load_config("gpu_tiny", data__name=f"folder:{tmp_path / 'imgs'}",
                       data__eval_name=f"npz:{tmp_path / 'test.npz'}", train__steps_per_dispatch=1)
  metrics = train.train_and_evaluate(config, tmp_path / "run")
  losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses)) and np.isfinite(metrics["psnr/denoised/0.25"])
  variables, metadata = checkpoint.load_model(tmp_path / "run" / "export", kind=export.KIND)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float32)}  # EMA and raw parameters
  assert metadata["train_compute_dtype"] == "bfloat16" and "dtype" not in metadata["model_kwargs"]
  score_fn = export.load_score_fn(tmp_path / "run" / "export")
  assert jnp.dtype(score_fn.module.dtype) == jnp.float32  # the export computes in float32 unless asked otherwise


def test_the_plan_is_the_widest_candidate_that_trains_enough_steps():
  rates = {112: 40.0, 96: 58.0, 64: 150.0}
  # 58 steps/s x 270 s x 0.9 = 14,094 steps: short of 15,000, so 64 channels (36,450 in whole dispatches of 10)
  assert rate_probe.plan(rates, [112, 96, 64], 270, 15_000, 10) == (64, 36_450)
  assert rate_probe.plan(rates, [112, 96, 64], 300, 15_000, 10) == (96, 15_660)
  assert rate_probe.plan(rates, [112, 96, 64], 450, 15_000, 10) == (112, 16_200)
  assert rate_probe.plan(rates, [96, 112], 450, 15_000, 10) == (96, 23_490)  # the order given decides
  with pytest.raises(ValueError, match=r"no candidate trains 15000 steps in 0.9 x 100 s \(112: 40.00 steps/s, "
                     r"96: 58.00 steps/s, 64: 150.00 steps/s\)"):
    rate_probe.plan(rates, [112, 96, 64], 100, 15_000, 10)


def test_the_probe_refuses_a_timing_of_no_seconds():  # the timing itself runs in tests/test_gpu_script.py
  with pytest.raises(ValueError, match="seconds=0 must be > 0"):
    rate_probe.measure_steps_per_sec({"tiny": load_config("gpu_tiny")}, seconds=0)


def test_the_config_docstring_states_the_network_measured_here():
  text = pathlib.Path(configs_util.ROOT / "configs" / "score_cifar10.py").read_text()
  report = train.model_report(load_config("gpu"))
  assert f"{report['params'] / 1e6:.1f}M parameters, {report['flops_per_image'] / 1e9:.1f} GFLOP per image" in text
