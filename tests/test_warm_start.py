"""train.init_from: a run that starts from the EMA parameters of a score export or a shipped model, or from a
classifier export (parameters and BatchNorm statistics)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import models
from scoresmooth_jax.modelio import classifier, export
from scoresmooth_jax.models import score_unet
from scoresmooth_jax.runtime import configs_util
from scoresmooth_jax.training import train, warm_start

KWARGS = dict(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), max_groups=4)


def _params(key, channels=1, **kwargs):
  module = models.get_model("score_unet", **{**KWARGS, **kwargs})
  return module.init(jax.random.key(key), jnp.zeros((1, 8, 8, channels)), jnp.ones((1,)))["params"]


def _export(path, params, channels=1, **kwargs):
  online = jax.tree.map(lambda a: a + 1.0, params)  # must not be what the new run starts from
  export.export_score_model(path, "score_unet", {**KWARGS, **kwargs}, params, online, (8, 8, channels), 0.01, 1.0)
  return str(path)


def test_initial_params_are_the_exports_ema_parameters(tmp_path):
  saved, fresh = _params(0), _params(1)
  got = warm_start.initial_params(_export(tmp_path / "export", saved), "score_unet", dict(KWARGS), (8, 8, 1), fresh)
  jax.tree.map(np.testing.assert_array_equal, got, saved)
  assert jax.tree.structure(got) == jax.tree.structure(fresh)


def test_a_different_network_is_refused_with_both_described(tmp_path):
  spec = _export(tmp_path / "export", _params(0))
  with pytest.raises(ValueError, match=r"is score_unet\(.*'channels': 8.* but the config trains score_unet\(.*"
                                       r"'channels': 16"):
    warm_start.initial_params(spec, "score_unet", {**KWARGS, "channels": 16}, (8, 8, 1), _params(1))
  with pytest.raises(ValueError, match="but the config trains ncsnpp"):
    warm_start.initial_params(spec, "ncsnpp", dict(KWARGS), (8, 8, 1), _params(1))
  rgb = _export(tmp_path / "rgb", _params(0, channels=3), channels=3)  # same network, colour images
  with pytest.raises(ValueError, match=r"trained on images of shape \(8, 8, 3\), the config trains on \(8, 8, 1\)"):
    warm_start.initial_params(rgb, "score_unet", dict(KWARGS), (8, 8, 1), _params(1))
  with pytest.raises(ValueError, match=r"train.init_from='.*missing' could not be loaded"):
    warm_start.initial_params(str(tmp_path / "missing"), "score_unet", dict(KWARGS), (8, 8, 1), _params(1))


def _grown_start(tmp_path, saved_kwargs=None, **grown):
  """The parameters a grown network starts from, after checking that its outputs are the saved network's."""
  changed = saved_kwargs or {}  # the saved network's differences from KWARGS
  saved_kwargs = {**KWARGS, **changed}
  # nonzero last convs and output projections: every saved block does something
  saved = jax.tree.map(lambda a: a + 0.05, _params(0, **changed))
  spec = _export(tmp_path / "export", saved, **changed)
  kwargs = {**saved_kwargs, **grown}
  module = models.get_model("score_unet", **kwargs)
  images = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
  sigmas = jnp.array([0.1, 0.4, 1.0])
  got = warm_start.initial_params(spec, "score_unet", kwargs, (8, 8, 1), module.init(jax.random.key(1), images,
                                                                                       sigmas)["params"])
  expected = models.get_model("score_unet", **saved_kwargs).apply({"params": saved}, images, sigmas)
  np.testing.assert_allclose(module.apply({"params": got}, images, sigmas), expected, rtol=1e-5, atol=1e-5)
  return got


@pytest.mark.parametrize("deeper", [2, (1, 3), (3, 1)])
def test_a_deeper_network_starts_exactly_as_the_saved_one(tmp_path, deeper):
  """Added residual blocks start as the identity and the saved ones keep their places, so the outputs agree."""
  got = _grown_start(tmp_path, num_res_blocks=deeper)
  # 6 saved blocks (2 levels down and up, 2 middle); each deepening adds 2 blocks per extra count: 4 here
  assert len([name for name in got if name.startswith("ResBlock_")]) - 6 == 4


@pytest.mark.parametrize("deeper", [1, (2, 1)])
def test_a_network_given_attention_starts_exactly_as_the_saved_one(tmp_path, deeper):
  """Attention added (and depth, at once) to a saved network without it: the outputs agree, and the attention
  blocks are there to train: after the 4x4 level's residual block down and up, and in the middle."""
  got = _grown_start(tmp_path, num_res_blocks=deeper, attention_resolutions=(4,))
  assert len([name for name in got if name.startswith("AttnBlock_")]) == 3


@pytest.mark.parametrize("deeper, attention_blocks", [(1, 3 + 2), ((2, 1), 3 + 4)])
def test_a_network_with_attention_can_gain_it_at_more_resolutions(tmp_path, deeper, attention_blocks):
  """Attention at 4x4 (down, middle, up) gains attention after every 8x8 block (down, up), and depth at once: the
  saved attention blocks move to their new numbers (the 8x8 ones come first in call order) and the outputs agree."""
  got = _grown_start(tmp_path, saved_kwargs={"attention_resolutions": (4,)}, num_res_blocks=deeper,
                     attention_resolutions=(4, 8))
  assert len([name for name in got if name.startswith("AttnBlock_")]) == attention_blocks


def test_attention_slots_follow_the_networks_call_order():
  """attention_block_slots names the AttnBlock_<k> that ScoreUNet creates: as many, at the stated places."""
  for blocks, attention in ((1, (4,)), ((2, 1), (8,)), ((1, 2), (4, 8)), (1, ())):
    names = [name for name in _params(0, num_res_blocks=blocks, attention_resolutions=attention)
             if name.startswith("AttnBlock_")]
    slots = score_unet.attention_block_slots(blocks, 2, attention, 8)
    assert len(slots) == len(names)
  assert score_unet.attention_block_slots((2, 1), 2, (4, 8), 8) == [
      ("down", 0, 0), ("down", 0, 1), ("down", 1, 0), ("middle", 0), ("up", 1, 0), ("up", 0, 0), ("up", 0, 1)]


def test_attention_can_only_be_added(tmp_path):
  spec = _export(tmp_path / "export", _params(0, attention_resolutions=(4,)), attention_resolutions=(4,))
  for attention in ((), (8,)):
    kwargs = {**KWARGS, "attention_resolutions": attention}
    with pytest.raises(ValueError, match=rf"has attention at resolutions \(4,\) but the config's network has it at "
                                         rf"{re.escape(repr(attention))}: .* include the saved ones"):
      warm_start.initial_params(spec, "score_unet", kwargs, (8, 8, 1), _params(1, attention_resolutions=attention))


def test_a_shallower_network_or_another_change_is_refused(tmp_path):
  spec = _export(tmp_path / "export", _params(0, num_res_blocks=2), num_res_blocks=2)
  shallower = {**KWARGS, "num_res_blocks": (2, 1)}
  with pytest.raises(ValueError, match=r"has \(2, 2\) residual blocks per level but the config's network has "
                                       r"\(2, 1\)"):
    warm_start.initial_params(spec, "score_unet", shallower, (8, 8, 1), _params(1, num_res_blocks=(2, 1)))
  deeper_and_wider = {**KWARGS, "num_res_blocks": 3, "channels": 16}  # depth is the one difference allowed
  with pytest.raises(ValueError, match="but the config trains score_unet"):
    warm_start.initial_params(spec, "score_unet", deeper_and_wider, (8, 8, 1), _params(1, num_res_blocks=3,
                                                                                         channels=16))


def test_per_level_block_counts_are_checked():
  with pytest.raises(ValueError, match=r"num_res_blocks=\(1,\) must be a count >= 1 or one such count per level "
                                       r"\(2 levels"):
    _params(0, num_res_blocks=(1,))
  with pytest.raises(ValueError, match="num_res_blocks=0"):
    _params(0, num_res_blocks=0)


def test_a_run_started_from_an_export_starts_from_its_ema_parameters(tmp_path, capsys):
  fast = dict(train__num_steps=4, train__log_every=2, train__eval_every=4, train__checkpoint_every=2)
  # Another seed than the runs below, so the source is far from their random initialisation.
  train.train_and_evaluate(configs_util.load_config("configs/score_digits.py", "tiny", seed=1, **fast), tmp_path / "a")
  source = train.load_score_fn(tmp_path / "a" / "export").params
  # A learning rate of ~0 keeps the parameters where they start, so the new export shows the starting point.
  still = dict(fast, train__num_steps=2, train__eval_every=2, optim__learning_rate=1e-12,
               train__init_from=str(tmp_path / "a" / "export"))
  train.train_and_evaluate(configs_util.load_config("configs/score_digits.py", "tiny", **still), tmp_path / "b")
  assert "starting from the parameters of" in capsys.readouterr().out
  for use_ema in (True, False):  # both the parameters and their EMA started from the source's EMA parameters
    got = train.load_score_fn(tmp_path / "b" / "export", use_ema=use_ema).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got, source)
  # Without init_from the same settings start from their random initialisation, far from the source.
  train.train_and_evaluate(configs_util.load_config("configs/score_digits.py", "tiny",
                                                    **{**still, "train__init_from": ""}), tmp_path / "c")
  fresh = train.load_score_fn(tmp_path / "c" / "export").params
  assert max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(source))) > 0.01


def test_the_shipped_cifar10_model_continues_from_its_float16_parameters_as_float32():
  """configs/score_cifar10.py:cpu_stage5 (the shipped model's last stage) with train.init_from=cifar10-cpu needs no
  earlier workdir: the shipped float16 parameters, upcast, every one in its place."""
  config = configs_util.load_config("configs/score_cifar10.py", "cpu_stage5", train__init_from="cifar10-cpu")
  task = train.build_task(config)  # the network train_score.py builds; eval_shape allocates nothing
  like = jax.eval_shape(task.init_variables, jax.random.key(0))["params"]
  got = warm_start.initial_params(config.train.init_from, task.model_name, config.model.kwargs.to_dict(),
                                  tuple(config.data.image_shape), like)
  shipped = export.load_score_fn(config.train.init_from).params
  assert jax.tree.structure(got) == jax.tree.structure(like)
  for value, saved in zip(jax.tree.leaves(got), jax.tree.leaves(shipped)):
    assert value.dtype == jnp.float32
    np.testing.assert_array_equal(value, np.asarray(saved, np.float32))


def _checkpoint_steps(workdir):
  folder = workdir / "checkpoints"
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_classifier_cannot_start_from_a_score_model(tmp_path):
  config = configs_util.load_config("configs/classifier_digits.py", "tiny", train__init_from="cifar10-cpu")
  with pytest.raises(ValueError, match="train.init_from='cifar10-cpu' could not be loaded as a classifier export"):
    train.train_and_evaluate(config, tmp_path)
  assert not _checkpoint_steps(tmp_path)


def test_a_classifier_run_starts_from_the_exports_parameters_and_batchnorm_statistics(tmp_path, capsys):
  fast = dict(train__num_steps=2, train__log_every=2, train__eval_every=2, train__checkpoint_every=2)
  # The source: a short run with another seed, so it is far from the random initialisation of the runs below.
  train.train_and_evaluate(configs_util.load_config("configs/classifier_digits.py", "tiny", seed=1, **fast),
                           tmp_path / "a")
  source = classifier.load_classifier(tmp_path / "a" / "export").variables
  # A learning rate of ~0 keeps the parameters where they start. BatchNorm statistics move with the data, so
  # they are compared at momentum's reach: far closer to the source's than to a fresh start's (ones and zeros).
  still = dict(fast, optim__learning_rate=1e-12, train__init_from=str(tmp_path / "a" / "export"))
  train.train_and_evaluate(configs_util.load_config("configs/classifier_digits.py", "tiny", **still), tmp_path / "b")
  assert "starting from the parameters of" in capsys.readouterr().out
  got = classifier.load_classifier(tmp_path / "b" / "export").variables
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), got["params"], source["params"])
  assert jax.tree.structure(got["batch_stats"]) == jax.tree.structure(source["batch_stats"])
  train.train_and_evaluate(configs_util.load_config("configs/classifier_digits.py", "tiny",
                                                    **{**still, "train__init_from": ""}), tmp_path / "c")
  far = classifier.load_classifier(tmp_path / "c" / "export").variables
  distance = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert distance(far["params"], source["params"]) > 0.01
  assert distance(got["batch_stats"], source["batch_stats"]) < distance(far["batch_stats"], source["batch_stats"])


def test_a_classifier_with_other_normalisation_or_network_is_refused(tmp_path):
  config = configs_util.load_config("configs/classifier_digits.py", "tiny")
  task = train.build_task(config)
  variables = task.init_variables(jax.random.key(0))
  kwargs = config.model.kwargs.to_dict()
  mean, std = tuple(config.normalization.mean), tuple(config.normalization.std)
  shape = tuple(config.data.image_shape)
  spec = str(classifier.export_classifier(tmp_path / "clf", task.model_name, kwargs, variables, mean, std,
                                          kwargs["num_classes"], shape))
  got = warm_start.initial_classifier_variables(spec, task.model_name, kwargs, shape, mean, std, variables)
  jax.tree.map(np.testing.assert_array_equal, got, variables)
  other = tuple(m + 0.1 for m in mean)
  with pytest.raises(ValueError, match=r"normalises with mean=.* but the config has normalization.mean="):
    warm_start.initial_classifier_variables(spec, task.model_name, kwargs, shape, other, std, variables)
  with pytest.raises(ValueError, match="set model.name/model.kwargs to the saved ones"):
    warm_start.initial_classifier_variables(spec, task.model_name, {**kwargs, "num_classes": 7}, shape, mean, std,
                                            variables)


def test_the_white_box_finetune_recipe_starts_from_the_converted_pretrained_resnet20(tmp_path, fixtures_dir):
  """configs/classifier_cifar10.py:finetune_gaussian_<sigma> fits akamaster's ResNet-20 as the converter writes it."""
  pytest.importorskip("torch", reason="converting the PyTorch checkpoint needs the torch extra")
  from scoresmooth_jax.modelio import convert

  spec = str(convert.convert_torch_checkpoint(fixtures_dir / "resnet20-12fca82f.th").export(tmp_path / "resnet20"))
  config = configs_util.load_config("configs/classifier_cifar10.py", "finetune_gaussian_0.5", train__init_from=spec)
  assert config.noise_sigma == 0.5 and config.eval.noise_sigmas == (0.5,)
  task = train.build_task(config)
  like = jax.eval_shape(task.init_variables, jax.random.key(0))
  got = warm_start.initial_classifier_variables(spec, task.model_name, config.model.kwargs.to_dict(),
                                                tuple(config.data.image_shape), tuple(config.normalization.mean),
                                                tuple(config.normalization.std), like)
  saved = classifier.load_classifier(spec).variables
  jax.tree.map(np.testing.assert_array_equal, got, saved)
