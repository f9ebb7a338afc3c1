"""Training: loss falls, sharded == single-device step, exact resume, mock-cifar10 end to end, bad configs fail
early, the exported models load, and the tiny digits classifier reaches 95 %."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import traverse_util

from scoresmooth_jax import denoise
from scoresmooth_jax.datasets import data, sources
from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.runtime import configs_util, sharding
from scoresmooth_jax.training import train, train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]

def load_config(name: str, variant: str = "", **overrides):
  return configs_util.load_config(f"configs/{name}.py", variant, **overrides)


def flat_config(name: str, variant: str) -> dict:
  return traverse_util.flatten_dict(json.loads(load_config(name, variant).to_json()), sep=".")


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# Four steps of the tiny score config, checkpointing every 2 (the programs are those of the tiny config).
FAST_SCORE = dict(train__num_steps=4, train__log_every=2, train__eval_every=4, train__checkpoint_every=2)


def test_tiny_score_training_loss_falls_and_exports(tmp_path):
  config = load_config("score_digits", "tiny")
  metrics = train.train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  for sigma in ("0.12", "0.25", "0.5", "1"):
    assert np.isfinite(metrics[f"psnr/denoised/{sigma}"])
  assert metrics["psnr/gain/0.5"] > 0  # even 40 steps beat the noisy input at sigma 0.5

  score_fn = train.load_score_fn(tmp_path / "export")
  assert (score_fn.sigma_min, score_fn.sigma_max, score_fn.image_shape) == (0.01, 1.0, (8, 8, 1))
  images = jnp.asarray(data.get_source("digits", "test").get_batch(np.arange(8))[0])
  noisy = images + 0.5 * jax.random.normal(jax.random.key(0), images.shape)
  denoised = jax.jit(lambda y: denoise.one_step(score_fn, y, 0.5))(noisy)
  assert denoised.shape == images.shape and jnp.all(jnp.isfinite(denoised))
  per_example = score_fn(noisy, jnp.full((8,), 0.5))
  np.testing.assert_allclose(per_example, score_fn(noisy, 0.5), rtol=1e-6)
  assert hash(score_fn) != hash(train.load_score_fn(tmp_path / "export"))  # identity hash, as compile caches need
  raw = train.load_score_fn(tmp_path / "export", use_ema=False)
  assert not np.allclose(raw(noisy, 0.5), per_example)  # EMA and raw parameters really differ
  with pytest.raises(ValueError, match="outside the score model's trained range"):
    score_fn.check_sigmas([0.25, 2.0])


@pytest.mark.parametrize("name, overrides", [
    ("score_digits", dict(model__kwargs__channel_mults=(1,))),
    ("classifier_digits", dict(model__kwargs__width=4)),  # BatchNorm: statistics over the global batch
])
def test_sharded_step_equals_single_device_step(name, overrides):
  config = load_config(name, "tiny", **overrides)
  task = train.build_task(config)
  # SGD, not Adam: Adam's first step is lr * sign(gradient), which turns float rounding in near-zero
  # gradients into lr-sized differences; SGD keeps the comparison at rounding level.
  optimizer = optax.sgd(0.1)
  images, labels = data.get_source("digits", "train").get_batch(np.arange(32))
  images, labels = images[None], labels[None]  # one step per dispatch
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = sharding.data_mesh(devices)
    state = train_state.jit_init(lambda key: train_state.create_state(task.init_variables(key), optimizer), mesh,
                                 jax.random.key(0))(jax.random.key(0))
    step = train_state.jit_train_step(train_state.get_train_step_fn(task.loss_fn, optimizer, 0.9), mesh)
    state, metrics = step(state, images, labels, jax.random.key(1))
    assert len(jax.tree.leaves(state.params)[0].devices()) == len(devices)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  assert len(jax.devices()) == 8
  (sharded, m8), (single, m1) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_steps_per_dispatch_equals_one_step_at_a_time():
  config = load_config("score_digits", "tiny", model__kwargs__channel_mults=(1,))
  task = train.build_task(config)
  optimizer = optax.sgd(0.1)  # see test_sharded_step_equals_single_device_step
  mesh = sharding.data_mesh()
  make_state = lambda key: train_state.create_state(task.init_variables(key), optimizer)
  step = train_state.jit_train_step(train_state.get_train_step_fn(task.loss_fn, optimizer, 0.9), mesh)
  images, labels = data.get_source("digits", "train").get_batch(np.arange(64))
  images, labels = images.reshape(2, 32, 8, 8, 1), labels.reshape(2, 32)
  rng = jax.random.key(1)
  scanned, metrics = step(train_state.jit_init(make_state, mesh, rng)(rng), images, labels, rng)  # lax.scan
  single = train_state.jit_init(make_state, mesh, rng)(rng)
  losses = []
  for i in range(2):
    single, m = step(single, images[i:i + 1], labels[i:i + 1], rng)
    losses.append(float(m["loss"][0]))
  assert int(scanned.step) == int(single.step) == 2
  np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(scanned)), jax.tree.leaves(jax.device_get(single))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_stop_resume_is_exact(tmp_path):
  straight = load_config("score_digits", "tiny", **FAST_SCORE)
  train.train_and_evaluate(straight, tmp_path / "straight")

  stopped = load_config("score_digits", "tiny", **{**FAST_SCORE, "train__num_steps": 2, "train__eval_every": 2})
  train.train_and_evaluate(stopped, tmp_path / "resumed")
  assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["2"]
  train.train_and_evaluate(straight, tmp_path / "resumed")  # same command, same workdir: resumes at step 2

  logged = [r["step"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
  assert logged == [2, 4]  # continued at step 3, no step repeated
  a = train.load_score_fn(tmp_path / "straight" / "export", use_ema=False).params
  b = train.load_score_fn(tmp_path / "resumed" / "export", use_ema=False).params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ema_a = train.load_score_fn(tmp_path / "straight" / "export").params
  ema_b = train.load_score_fn(tmp_path / "resumed" / "export").params
  for x, y in zip(jax.tree.leaves(ema_a), jax.tree.leaves(ema_b)):
    np.testing.assert_array_equal(x, y)


def test_extending_a_finished_cosine_run_is_refused(tmp_path):
  """Resuming a run whose cosine reached 0 with more steps would restart at a high rate without warm-up."""
  cosine = {**FAST_SCORE, "optim__schedule": "cosine", "optim__warmup_steps": 0}
  train.train_and_evaluate(load_config("score_digits", "tiny", **{**cosine, "train__num_steps": 2,
                                                                  "train__eval_every": 2}), tmp_path / "run")
  expected = r"step 2 would raise the learning rate from 0 \(.*num_steps=2,.*to 0\.001 \(train\.num_steps=4"
  with pytest.raises(ValueError, match=expected):
    train.train_and_evaluate(load_config("score_digits", "tiny", **cosine), tmp_path / "run")


def test_mock_cifar10_end_to_end(tmp_path):
  config = load_config("score_cifar10", "tiny")
  with tfds.testing.mock_data(num_examples=32):
    metrics = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(metrics["loss/bucket_0"]) and np.isfinite(metrics["psnr/denoised/0.25"])
  score_fn = train.load_score_fn(tmp_path / "export")
  assert score_fn.image_shape == (32, 32, 3) and score_fn.metadata["model"] == "ncsnpp"
  assert score_fn(jnp.full((2, 32, 32, 3), 0.5), 0.25).shape == (2, 32, 32, 3)


def test_mock_cifar10_classifier_trains_with_cohens_crops_and_flips(tmp_path, monkeypatch):
  config = load_config("classifier_cifar10", "tiny")
  assert config.data.random_crop_padding == 4 and config.data.random_flip
  crops = []
  original = data.random_crops
  monkeypatch.setattr(data, "random_crops", lambda *args: crops.append(args[1]) or original(*args))
  with tfds.testing.mock_data(num_examples=32):
    metrics = train.train_and_evaluate(config, tmp_path)
  assert crops and set(crops) == {4}  # the training batches went through the crops
  assert 0.0 <= metrics["accuracy/clean"] <= 1.0


@pytest.mark.parametrize("name, overrides, message", [
    ("score_digits", dict(sigma__sigma_min=0.5, sigma__sigma_max=0.5), "sigma_min=0.5, sigma_max=0.5"),
    ("score_digits", dict(sigma__sigma_min=1.0, sigma__sigma_max=0.1), "sigma_min=1.0, sigma_max=0.1"),
    ("score_digits", dict(data__image_shape=(28, 28, 1)), r"image_shape=\(28, 28, 1\) but digits has images of"),
    ("score_digits", dict(data__name="no_such_dataset_xyz"), "unknown dataset 'no_such_dataset_xyz'"),
    ("score_digits", dict(model__name="no_such_model"), "unknown model 'no_such_model'"),
    ("score_digits", dict(eval__sigmas=(0.25, 2.0)), "eval.sigmas has 2.0, outside the trained range"),
    ("score_digits", dict(train__steps_per_dispatch=3), "multiple of train.steps_per_dispatch=3"),
    ("score_digits", dict(task="denoise"), "task='denoise'"),
    ("classifier_digits", dict(model__kwargs__num_classes=100), "num_classes=100 but digits has 10 classes"),
])
def test_bad_config_fails_before_training(tmp_path, name, overrides, message):
  config = load_config(name, "tiny", **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_nan_loss_stops_training(tmp_path, monkeypatch):
  # Corrupt the training images after validation, so the program is the tiny config's (compiled already).
  real_get_source = data.get_source
  poisoned = data.get_source("digits", "train")
  poisoned = sources.ArraySource("digits", *poisoned.get_batch(np.arange(len(poisoned))))
  poisoned._images[:] = np.nan
  monkeypatch.setattr(data, "get_source", lambda name, split, **kw: poisoned if split == "train"
                      else real_get_source(name, split, **kw))
  with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
    train.train_and_evaluate(load_config("score_digits", "tiny", **FAST_SCORE), tmp_path)
  assert not (tmp_path / "export").exists() and not list((tmp_path / "checkpoints").iterdir())


def test_tiny_digits_classifier_reaches_95_percent(tmp_path):
  metrics = train.train_and_evaluate(load_config("classifier_digits", "tiny"), tmp_path)
  clf = classifier.load_classifier(tmp_path / "export")
  images, labels = data.get_source("digits", "test").get_batch(np.arange(400))
  correct = classifier.accuracy(clf, images, labels)
  assert correct >= 380, f"{correct} / 400"
  assert metrics["accuracy/clean"] == pytest.approx(correct / 400)
  assert clf.metadata["noise_sigma"] == 0.0 and set(metrics) == {"accuracy/clean", "accuracy/noise_0.25",
                                                                 "accuracy/noise_0.5"}


@pytest.mark.parametrize("name, min_params, max_params", [
    ("score_digits", 5e4, 3e5), ("score_cifar10", 2e7, 1e8), ("score_imagenet", 2e7, 2e8),
    ("classifier_digits", 1e4, 1e6), ("classifier_cifar10", 1e6, 3e6),
])
def test_full_configs_build(name, min_params, max_params):
  report = train.model_report(load_config(name))
  assert min_params < report["params"] < max_params and report["flops_per_image"] > 0


def test_model_line_names_flops_or_says_xla_gave_none():
  """The GPU backend's cost analysis has no FLOP count: the training log says so rather than printing nan."""
  report = {"model": "score_unet", "params": 1_875_891, "image_shape": [32, 32, 3]}
  line = train.describe_model(dict(report, flops_per_image=7.6218e8))
  assert line == ("model score_unet: 1,875,891 parameters, 762.18 MFLOPs per (32, 32, 3) image "
                  "(forward pass, XLA cost analysis)")
  line = train.describe_model(dict(report, flops_per_image=float("nan")))
  assert "nan" not in line and "no FLOP count" in line and "1,875,891 parameters" in line


def test_cifar10_cpu_stages_train_the_shipped_network_each_from_the_one_before():
  """The stages of cifar10-cpu: one network (stage 5's, within the 5 MB float16 limit) that gains attention as it
  goes, each stage a new cosine from the export the docstring's loop left in the stage before's workdir."""
  last = flat_config("score_cifar10", "cpu_stage5")
  attention = {1: [], 2: [16], 3: [16], 4: [8, 16], 5: [8, 16]}
  steps = {1: 10_000, 2: 5000, 3: 5000, 4: 3000, 5: 16_000}
  for k in range(1, 6):
    stage = flat_config("score_cifar10", f"cpu_stage{k}")
    changed = {key for key in last if stage[key] != last[key]}
    assert set(stage) == set(last) and changed <= {"model.kwargs.attention_resolutions", "train.num_steps",
                                                   "optim.learning_rate", "optim.warmup_steps", "train.init_from"}
    assert stage["model.kwargs.attention_resolutions"] == attention[k] and stage["train.num_steps"] == steps[k]
    assert stage["train.init_from"] == ("" if k == 1 else f"workdirs/cifar10_cpu/stage{k - 1}/export")
    assert (stage["optim.learning_rate"], stage["optim.warmup_steps"]) == ((2e-3, 100) if k == 1 else (1e-3, 500))
  assert "--workdir workdirs/cifar10_cpu/stage$k" in (ROOT / "configs" / "score_cifar10.py").read_text()
  report = train.model_report(load_config("score_cifar10", "cpu_stage5"))
  assert 2.0e6 < report["params"] and 2 * report["params"] < 5e6


def test_accel_cifar10_is_stage_one_network_at_accelerator_batch_and_ships_within_5_mb():
  stage1, accel = flat_config("score_cifar10", "cpu_stage1"), flat_config("score_cifar10", "accel")
  assert set(accel) == set(stage1)
  assert {key.split(".")[0] for key in accel if accel[key] != stage1[key]} == {"data", "optim", "train"}
  assert accel["data.in_memory"] and not stage1["data.in_memory"]
  report = train.model_report(load_config("score_cifar10", "accel"))
  assert 1e6 < report["params"] and 2 * report["params"] < 5e6


def test_cifar10_ablations_train_and_evaluate_on_the_recipe_data_at_its_batch():
  """configs/proj/cifar10_cpu: each run compares with the recipe's stage 1 (same data, images and batch)."""
  stage1 = flat_config("score_cifar10", "cpu_stage1")
  for variant in ("first", "wide", "more", "deep", "edm"):
    run = traverse_util.flatten_dict(json.loads(configs_util.load_config(
        f"configs/proj/cifar10_cpu/ablations.py:{variant}").to_json()), sep=".")
    for key in [k for k in stage1 if k.startswith("data.")] + ["train.batch_size", "optim.schedule"]:
      assert run[key] == stage1[key], (variant, key)
    assert run != stage1, variant
  report = train.model_report(configs_util.load_config("configs/proj/cifar10_cpu/ablations.py:deep"))
  assert 2.3e6 < report["params"] < 2.5e6  # the README's 2.40M


def test_train_score_script_reports_model(tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_score.py"), "--config",
                        str(ROOT / "configs" / "score_digits.py"), "--config.report_only", "--workdir",
                        str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "126,985 parameters" in out.stdout and "MFLOPs per (8, 8, 1) image" in out.stdout
  assert not list(tmp_path.iterdir())  # report only: nothing trained or written


@pytest.mark.parametrize("variant", ["cpu_stage1", "accel"])
def test_small_cifar10_configs_train_on_an_image_folder(tmp_path, variant):
  """The :cpu_stage1 and :accel variants' data path end to end: JPEG folder for training (decoded into memory for
  :accel), a separate npz for evaluation."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for name in ("airplane", "truck"):
    (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / name /
                                                                              f"{i}.jpg")
  np.savez(tmp_path / "test.npz", images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels=np.zeros(8, int))
  k = 2 if variant == "accel" else 1  # :accel dispatches several steps at once
  config = load_config("score_cifar10", variant, data__name=f"folder:{tmp_path / 'imgs'}",
                       data__eval_name=f"npz:{tmp_path / 'test.npz'}", model__kwargs__channels=8,
                       train__batch_size=8, train__num_steps=2, train__log_every=k, train__eval_every=2,
                       train__checkpoint_every=2, train__steps_per_dispatch=k, eval__batch_size=8,
                       eval__num_examples=8)
  assert config.model.name == "score_unet" and config.data.random_flip
  assert config.data.in_memory == (variant == "accel")
  metrics = train.train_and_evaluate(config, tmp_path / "run")
  assert np.isfinite(metrics["psnr/denoised/0.25"]) and metrics["psnr/noisy/0.25"] == pytest.approx(12.0, abs=0.3)
  assert metrics["examples"] == 8  # the model card reads the curve's image count from here
  assert train.load_score_fn(tmp_path / "run" / "export").image_shape == (32, 32, 3)


def test_cifar10_recipe_without_its_evaluation_images_says_where_they_go(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the recipe's paths are relative: data/cifar10 and data/cifar10_test.npz
  from PIL import Image

  (tmp_path / "data" / "cifar10" / "train" / "cat").mkdir(parents=True)
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "data" / "cifar10" / "train" / "cat" / "0.jpg")
  with pytest.raises(FileNotFoundError, match=r"npz:data/cifar10_test\.npz: no file data/cifar10_test\.npz"):
    train.train_and_evaluate(load_config("score_cifar10", "cpu_stage1"), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()
