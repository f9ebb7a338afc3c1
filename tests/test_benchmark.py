"""Speed work and the benchmark: BatchNorm folding, the automatic batch size, the PyTorch baseline, and the
benchmark's own logic end to end in its tiny mode.

Folding must not change the function (logits to ~1e-5 relative); the auto batch size must fit the budget it was
given and be the largest power of two that does; the PyTorch loop must compute the same network (logits) and the
same distribution of labels (counts, by a chi-square test) as ``smoothing.sample_counts``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import benchmarks
from benchmarks import stages, torch_baseline
from scoresmooth_jax import noise, smoothing
from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.runtime import batching
from scoresmooth_jax.models import resnet

MIB = 2**20


def _classifier(module, shape, seed=0):
  variables = benchmarks.random_variables(module, jnp.zeros((1, *shape)), seed=seed)
  # Spread BatchNorm statistics well away from (0, 1), so a wrong fold cannot hide behind near-identity BNs.
  rng = np.random.default_rng(seed + 1)
  variables["batch_stats"] = jax.tree.map(
      lambda a: (rng.uniform(0.3, 3.0, a.shape) if a.ndim == 1 else a).astype(np.float32), variables["batch_stats"])
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, a: (a + rng.normal(0, 0.5, a.shape)).astype(np.float32)
      if jax.tree_util.keystr(p).endswith("['bias']") else a, variables["params"])
  return classifier.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                               mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1], num_classes=10,
                               image_shape=shape)


@pytest.mark.parametrize("module, shape", [
    (resnet.CifarResNet(depth=8, shortcut="B", width=8), (16, 16, 3)),
    (resnet.CifarResNet(depth=8, shortcut="A", width=8), (8, 8, 1)),
    (resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=10), (32, 32, 3)),
], ids=["cifar_B", "cifar_A", "bottleneck"])
def test_batchnorm_folding_keeps_the_logits(module, shape):
  clf = _classifier(module, shape)
  folded = clf.folded()
  assert folded.batchnorm_folded and not clf.batchnorm_folded and folded.folded() is folded
  assert set(folded.variables) == {"params"}
  expected = jax.eval_shape(module.clone(fold_bn=True).init, jax.random.key(0), jnp.zeros((1, *shape)))
  assert (jax.tree.map(lambda a: a.shape, folded.variables)
          == jax.tree.map(lambda a: a.shape, expected))  # exactly the folded network's parameters
  x = np.random.default_rng(2).uniform(size=(8, *shape)).astype(np.float32)
  want, got = np.asarray(jax.jit(clf)(x)), np.asarray(jax.jit(folded)(x))
  assert np.ptp(want) > 0.1  # logits that differ: the check below is not vacuous
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_folding_through_export_and_options(tmp_path):
  shape = (8, 8, 3)
  module = resnet.CifarResNet(depth=8, shortcut="B", width=4)
  clf = _classifier(module, shape)
  classifier.export_classifier(tmp_path / "clf", "cifar_resnet", {"depth": 8, "shortcut": "B", "width": 4},
                               clf.variables, clf.mean, clf.std, 10, shape)
  loaded = classifier.load_classifier(tmp_path / "clf", compute_dtype="bfloat16", fold_batchnorm=True)
  assert loaded.batchnorm_folded and loaded.compute_dtype == jnp.bfloat16 and loaded.module.dtype == jnp.bfloat16
  assert not classifier.load_classifier(tmp_path / "clf").batchnorm_folded  # the default keeps stored arrays
  x = np.random.default_rng(0).uniform(size=(4, *shape)).astype(np.float32)
  assert jax.jit(loaded)(x).dtype == jnp.float32
  with pytest.raises(ValueError, match="inference-only"):
    module.clone(fold_bn=True).apply(loaded.variables, x, train=True)
  with pytest.raises(ValueError, match="already folded"):
    resnet.fold_batchnorm(loaded.variables)


def _small_cnn(shape):
  """A one-convolution classifier: compiles in milliseconds, and its activations grow with the batch."""
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, shape[-1], 16)), jnp.float32)
  head = jnp.asarray(np.random.default_rng(1).normal(size=(16, 10)), jnp.float32)

  def clf(x):
    h = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ head

  return clf


def test_auto_batch_size_is_the_largest_power_of_two_within_budget():
  shape = (16, 16, 3)
  clf = _small_cnn(shape)
  budget = 2 * MIB
  chosen = batching.auto_batch_size(clf, shape, budget)
  assert chosen >= 8 and chosen & (chosen - 1) == 0  # a power of two
  assert batching.estimate_step_memory(clf, shape, chosen) <= budget < batching.estimate_step_memory(
      clf, shape, 2 * chosen)  # and the largest that fits
  fixed, per_sample = 1e5, 1e4  # the arithmetic alone: (2 MiB - 1e5) / 1e4 = 199.7 -> 128
  assert batching.batch_size_for_budget(fixed, per_sample, budget) == 128
  assert batching.batch_size_for_budget(fixed, per_sample, 10**12, max_batch_size=256) == 256
  assert batching.batch_size_for_budget(fixed, per_sample, 10**12) == batching.DEFAULT_MAX_BATCH_SIZE
  with pytest.raises(ValueError, match="too small for even one sample"):
    batching.batch_size_for_budget(fixed, per_sample, int(fixed / 2))


@pytest.fixture(scope="module")
def torch_and_jax_pair():
  pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")
  shape = (8, 8, 3)
  module = resnet.CifarResNet(depth=8, shortcut="B", width=4)
  clf = _classifier(module, shape, seed=3)
  rng = np.random.default_rng(4)
  clf = benchmarks.calibrate_classifier(clf, rng.uniform(size=(64, *shape)).astype(np.float32))
  model = torch_baseline.build_cifar_resnet(8, 10, clf.mean, clf.std, width=4)
  torch_baseline.load_flax_variables(model, clf.variables)
  return clf, model


def test_torch_baseline_computes_the_same_network(torch_and_jax_pair):
  clf, model = torch_and_jax_pair
  x = np.random.default_rng(5).uniform(size=(16, 8, 8, 3)).astype(np.float32)
  want = np.asarray(jax.jit(clf)(x))
  np.testing.assert_allclose(torch_baseline.logits(model, x), want, atol=1e-4 * np.abs(want).max())


def test_torch_baseline_counts_agree_with_sample_counts(torch_and_jax_pair):
  clf, model = torch_and_jax_pair
  image = np.random.default_rng(6).uniform(size=(8, 8, 3)).astype(np.float32)
  n, sigma = 4000, 0.5
  ours = smoothing.sample_counts(clf, image, noise.Gaussian(sigma), n, jax.random.key(0), num_classes=10,
                                 batch_size=100)
  theirs = torch_baseline.sample_counts(model, image, sigma, n, batch_size=250, num_classes=10, seed=0)
  assert ours.sum() == theirs.sum() == n
  assert (np.sort(ours)[-2:] >= 0.05 * n).all()  # at least two classes: the test has power
  used = (ours + theirs) > 0
  _, p_value, _, _ = stats.chi2_contingency(np.stack([ours[used], theirs[used]]))
  assert p_value > 1e-3, (ours, theirs)
  # Different seeds draw different noise but the same distribution; the same seed the same draws.
  again = torch_baseline.sample_counts(model, image, sigma, n, batch_size=250, num_classes=10, seed=0)
  np.testing.assert_array_equal(again, theirs)


def test_resnet_parts_compose_to_the_network_and_match_pytorch_part_by_part(torch_and_jax_pair):
  clf, model = torch_and_jax_pair
  folded = clf.folded()
  images = jnp.asarray(np.random.default_rng(7).uniform(size=(16, 8, 8, 3)).astype(np.float32))
  jax_fns = stages.jax_parts(folded)
  ours, logits = stages.run_parts(jax_fns, images)
  assert stages.check_composition(logits, folded, images, atol=1e-4) < 1e-4
  torch = torch_baseline.import_torch()
  torch_fns = stages.torch_parts(model)
  theirs, _ = stages.run_parts(torch_fns, torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()))
  for part in stages.PARTS[1:]:  # each part's input is the previous part's output: same layers on both sides
    want = np.asarray(ours[part])
    got = theirs[part].numpy()
    got = got.transpose(0, 2, 3, 1) if got.ndim == 4 else got
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), err_msg=part)
  other = benchmarks.calibrate_classifier(_classifier(resnet.CifarResNet(depth=8, shortcut="B", width=4), (8, 8, 3),
                                                 seed=9), np.asarray(images)).folded()
  with pytest.raises(AssertionError, match="compose to logits"):
    stages.check_composition(logits, other, images, atol=1e-4)
  with pytest.raises(ValueError, match="BatchNorm-folded CifarResNet"):
    stages.jax_parts(clf)


def test_benchmark_runs_end_to_end_in_tiny_mode(tmp_path):
  config = benchmarks.tiny_config()
  results = benchmarks.run_benchmark(config, log=lambda line: None)
  path = tmp_path / "bench.json"
  benchmarks.write_json(results, path)
  loaded = json.loads(path.read_text())
  assert {"environment", "config", "rows", "targets", "agreement", "auto_batch_size", "memory_check",
          "notes"} <= set(loaded)
  assert set(loaded["targets"]) == set(benchmarks.TARGETS)
  rows = {r["id"]: r for r in loaded["rows"]}
  timed = [f"{s}.{v}" for s in "ab" for v in config.classifier_variants]
  timed += ["c.raw", "c.counts", "d.score", "d.classifier", "d.raw", "d.counts", "e.train"]
  try:
    torch_baseline.import_torch()
    timed += ["torch.f32"] + [f"jax_vs_torch.{v}" for v in config.classifier_variants]
    sweep = ["sweep.torch.8"] + [f"sweep.jax.{v}.8" for v in config.classifier_variants]
    timed += sweep
    # Each side at its fastest batch size: the target is the best JAX rate over the best PyTorch rate, from
    # uncontended medians when every compared row had uncontended calls.
    compared = ["torch.f32", "torch.f32_1thread"] + [f"jax_vs_torch.{v}" for v in config.classifier_variants] + sweep
    key = ("uncontended_samples_per_s" if all(rows[i]["uncontended_samples_per_s"] for i in compared)
           else "samples_per_s")
    jax_best = max(rows[i][key] for i in ("jax_vs_torch.f32_folded", "sweep.jax.f32_folded.8"))
    torch_best = max(rows[i][key] for i in ("torch.f32", "torch.f32_1thread", "sweep.torch.8"))
    target = loaded["targets"]["jax_float32_vs_torch"]
    assert target["value"] == pytest.approx(jax_best / torch_best)
    assert "at equal batch size: B=8" in target["note"] and "B=16" in target["note"]
    assert rows["sweep.jax.f32_folded.8"]["batch_size"] == 8
    assert rows["sweep.torch.8"]["batch_size"] == 8 * jax.device_count()  # PyTorch runs the whole batch
    assert rows["sweep.jax.f32_folded.8"]["ratio_to"] == "sweep.torch.8"
    # Each target says what XLA compiled the classifier's convolutions to (bfloat16 may run in float32).
    for name, v in (("jax_float32_vs_torch", "f32_folded"), ("jax_bfloat16_vs_torch", "bf16_folded")):
      assert loaded["targets"][name]["note"].endswith(
          "compiled " + benchmarks.precision.describe(rows[f"a.{v}"]["compute_types"]))
  except ImportError:
    pass
  for row_id in timed:
    row = rows[row_id]
    assert row["samples_per_s"] > 0 and row["flops_per_sample"] > 0, row
    assert row["achieved_flops_per_s"] == pytest.approx(row["samples_per_s"] * row["flops_per_sample"])
  for v in config.classifier_variants:  # every convolution of the depth-8 ResNet (7 + 2 shortcuts) is counted
    assert sum(rows[f"a.{v}"]["compute_types"]["convolution"].values()) == 9, rows[f"a.{v}"]
  timed_parts = [f"parts.jax.{p}" for p in stages.PARTS]
  if "torch.f32" in timed:
    timed_parts += [f"parts.torch.{p}" for p in stages.PARTS]
    assert all(rows[f"parts.jax.{p}"]["ratio"] > 0 for p in stages.PARTS)
  for row_id in timed_parts:
    assert rows[row_id]["samples_per_s"] > 0 and rows[row_id]["flops_per_sample"] > 0, row_id
  assert loaded["parts"]["composition_max_abs_error"] < 1e-3
  for row_id in ("b.f32_folded", "c.counts", "d.counts"):
    assert rows[row_id]["ratio"] > 0
  for row_id in ("mem.small", "mem.large"):
    assert rows[row_id]["peak_memory_bytes"] > 0 and rows[row_id]["peak_memory_growth_bytes"] is not None
  assert loaded["targets"]["peak_memory_large_n_vs_small_n"]["met"] is not None
  assert 0.0 <= loaded["agreement"]["random_resnet"]["agreement"] <= 1.0
  auto = loaded["auto_batch_size"]
  assert auto["estimated_bytes"] <= auto["budget_bytes"] and auto["batch_size"] & (auto["batch_size"] - 1) == 0
  table = benchmarks.markdown_table(results)
  assert table.count("\n| ") >= len(timed) and "peak_memory_large_n_vs_small_n" in table
  assert loaded["config"]["depth"] == config.depth


def test_batch_size_sweep_config_drops_the_main_batch_size_and_names_bad_values():
  config = benchmarks.BenchmarkConfig(batch_size=64, torch_sweep_batch_sizes=(400, 64, 32, 32))
  assert config.torch_sweep_batch_sizes == (32, 400)  # B=64 is already timed by the equal-batch rows
  assert benchmarks.BenchmarkConfig(torch_sweep_batch_sizes=()).torch_sweep_batch_sizes == ()
  with pytest.raises(ValueError, match=r"torch_sweep_batch_sizes=\(32, 0\)"):
    benchmarks.BenchmarkConfig(torch_sweep_batch_sizes=(32, 0))
