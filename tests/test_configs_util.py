"""configs_util.load_config: config files outside absl flags, with the command line's ``path:variant`` form."""

import pytest

from scoresmooth_jax.runtime import configs_util


def test_a_variant_suffix_picks_the_variant_as_on_the_command_line():
  by_suffix = configs_util.load_config("configs/score_cifar10.py:accel")
  by_argument = configs_util.load_config("configs/score_cifar10.py", "accel")
  assert by_suffix.to_dict() == by_argument.to_dict()
  assert by_suffix.train.batch_size == 128 and by_suffix.data.in_memory  # :accel, not the NCSN++ default
  assert configs_util.load_config("configs/score_cifar10.py").model.name == "ncsnpp"


def test_overrides_apply_to_the_suffixed_variant():
  config = configs_util.load_config("configs/score_cifar10.py:cpu_stage4", train__num_steps=40)
  assert config.train.num_steps == 40 and config.model.kwargs.attention_resolutions == (8, 16)


def test_two_different_variants_are_refused():
  with pytest.raises(ValueError, match=r"names variant 'accel' and variant='gpu'"):
    configs_util.load_config("configs/score_cifar10.py:accel", "gpu")


def test_a_missing_file_is_named():
  with pytest.raises(FileNotFoundError, match=r"configs/nowhere\.py not found"):
    configs_util.load_config("configs/nowhere.py:tiny")
