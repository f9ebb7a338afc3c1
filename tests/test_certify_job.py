"""Certification jobs end to end: records, resume after SIGKILL, two processes, and early input errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from scoresmooth_jax import models, smoothing
from scoresmooth_jax.certification import certify_job, records, report
from scoresmooth_jax.modelio import checkpoint, classifier, export
from scoresmooth_jax.runtime import batching
from scoresmooth_jax.runtime.configs_util import load_config
from scoresmooth_jax.modelio import score_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_KWARGS = dict(channels=4, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), max_groups=4)
CLF_KWARGS = dict(depth=8, num_classes=10, shortcut="A")
VOLATILE = ("time", "samples_per_s")  # wall-clock fields; everything else must match exactly


def make_exports(root, shape, sigma_max=1.0):
  """Random-weight classifier and score exports: the job's plumbing does not need trained models."""
  clf_module = models.get_model("cifar_resnet", **CLF_KWARGS)
  variables = clf_module.init(jax.random.key(0), jnp.zeros((1, *shape)))
  clf_path = classifier.export_classifier(root / "clf", "cifar_resnet", CLF_KWARGS, variables, [0.5] * shape[-1],
                                          [0.25] * shape[-1], 10, shape)
  score_module = models.get_model("score_unet", **SCORE_KWARGS)
  params = score_module.init(jax.random.key(1), jnp.zeros((1, *shape)), jnp.ones((1,)))["params"]
  score_path = export.export_score_model(root / "score", "score_unet", SCORE_KWARGS, params, params, shape,
                                         0.01, sigma_max)
  return str(clf_path), str(score_path)


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
  return make_exports(tmp_path_factory.mktemp("digits_models"), (8, 8, 1))


def tiny_config(clf_path, score_path, **overrides):
  return load_config("configs/certify_digits.py", "tiny", classifier__path=clf_path, denoiser__score=score_path,
                     **overrides)


def stable(recs):
  return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in recs), key=lambda r: r["idx"])


def test_tiny_certification_under_tfds_mock_cifar10(tmp_path):
  clf_path, score_path = make_exports(tmp_path, (32, 32, 3))
  config = tiny_config(clf_path, score_path, dataset__name="cifar10", noise__type="laplace", dataset__max=4)
  with tfds.testing.mock_data(num_examples=5):
    recs = certify_job.run_certification(config, tmp_path / "w")
  assert [r["idx"] for r in recs] == [0, 1, 2, 3]
  tsv = (tmp_path / "w" / "certify.tsv").read_text().splitlines()
  assert tsv[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
  for line, r in zip(tsv[1:], recs):
    idx, label, predict, radius, correct, _ = line.split("\t")
    assert int(correct) == int(int(predict) == int(label)) == r["correct"]
    assert float(radius) == pytest.approx(r["radius"], rel=1e-5)
    assert r["norm"] == "l1" and r["denoiser"] == "annealed" and sum(r["n0_counts"]) == r["n0"]
  assert report.check(report.load_records(tmp_path / "w")) == []


def test_predict_mode_writes_cohens_predict_columns(tmp_path, digits_models):
  recs = certify_job.run_prediction(tiny_config(*digits_models, denoiser__kind="one_step"), tmp_path)
  header = (tmp_path / "predict.tsv").read_text().splitlines()[0]
  assert header.split("\t") == ["idx", "label", "predict", "correct", "time"]
  assert len(recs) == 6 and all(r["predict"] in range(-1, 10) for r in recs)


def _script_env():
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONUNBUFFERED="1")


def _flags(config_overrides):
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in config_overrides.items()]


def test_killed_run_resumes_to_exactly_the_uninterrupted_records(tmp_path, digits_models):
  clf_path, score_path = digits_models
  overrides = dict(dataset__max=14, certify__n=3000, certify__batch_size=64, denoiser__kind="one_step")
  expected = certify_job.run_certification(tiny_config(clf_path, score_path, **overrides), tmp_path / "reference")
  workdir = tmp_path / "killed"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "certify.py"),
         "--config", os.path.join(ROOT, "configs", "certify_digits.py:tiny"), f"--workdir={workdir}",
         f"--config.classifier.path={clf_path}", f"--config.denoiser.score={score_path}", *_flags(overrides)]
  proc = subprocess.Popen(cmd, env=_script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  jsonl = workdir / "certify.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = len(records.read_jsonl(jsonl)[0])
  assert 3 <= killed_at < 14
  done = subprocess.run(cmd, env=_script_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"{killed_at} already done" in done.stderr
  resumed = records.read_jsonl(jsonl)[0]
  assert stable(resumed) == stable(expected)
  assert len((workdir / "certify.tsv").read_text().splitlines()) == 1 + 14


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("overrides", [
    dict(dataset__max=10, denoiser__kind="one_step"),
    # Sequential: each image's looks draw from folds of its own key, so the split over processes changes nothing.
    dict(dataset__max=6, denoiser__kind="none", certify__n=160, certify__sequential__enabled=True,
         certify__sequential__first_look=10, certify__sequential__radii=(0.0, 0.25, 0.5))],
    ids=["fixed_n", "sequential"])
def test_two_processes_produce_the_records_of_one(tmp_path, digits_models, overrides):
  clf_path, score_path = digits_models
  expected = certify_job.run_certification(tiny_config(clf_path, score_path, **overrides), tmp_path / "one")
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "certify.py"),
           "--config", os.path.join(ROOT, "configs", "certify_digits.py:tiny"), f"--workdir={tmp_path / 'two'}",
           f"--config.classifier.path={clf_path}", f"--config.denoiser.score={score_path}", *_flags(overrides),
           "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
    procs.append(subprocess.Popen(cmd, env=_script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  files = sorted(f.name for f in (tmp_path / "two").glob("certify*.jsonl"))
  assert files == ["certify.p0-of-2.jsonl", "certify.p1-of-2.jsonl"]
  parts = [records.read_jsonl(tmp_path / "two" / f)[0] for f in files]
  assert {r["idx"] for r in parts[0]}.isdisjoint({r["idx"] for r in parts[1]})
  assert stable(report.load_records(tmp_path / "two")) == stable(expected)


@pytest.fixture
def no_sampling(monkeypatch):
  """Makes any sampling an error, so a test proves its failure came before sampling."""
  def boom(*args, **kwargs):
    raise AssertionError("sampling started before the input error was found")
  monkeypatch.setattr(smoothing, "sample_counts", boom)


@pytest.mark.parametrize("overrides,match", [
    (dict(certify__n0=0), r"certify\.n0=0 must be an integer >= 1"),
    (dict(certify__n=0), r"certify\.n=0 must be an integer >= 1"),
    (dict(certify__alpha=1.5), r"certify\.alpha=1.5 must lie in \(0, 1\)"),
    (dict(certify__batch_size=-1), r"batch_size=-1 must be >= 1 .* or 0 to choose it"),
    (dict(denoiser__kind="one_step", noise__type="uniform"), "one_step.*exact only for Gaussian"),
    (dict(noise__sigma=1.5, denoiser__kind="one_step"), r"sigma=1.5 is outside the score model's trained range"),
    (dict(noise__sigma=0.0), "sigma=0.0"),
    (dict(denoiser__kind="sharpen"), "denoiser.kind='sharpen'"),
])
def test_bad_input_fails_before_sampling(tmp_path, digits_models, no_sampling, overrides, match):
  with pytest.raises(ValueError, match=match):
    certify_job.run_certification(tiny_config(*digits_models, **overrides), tmp_path)


def test_bad_models_fail_before_sampling(tmp_path, digits_models, no_sampling):
  clf_path, score_path = digits_models
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    certify_job.run_certification(tiny_config(str(tmp_path / "missing"), score_path), tmp_path / "w")
  with pytest.raises(FileNotFoundError, match="nonexistent.npz"):
    certify_job.run_certification(tiny_config(clf_path, score_path, dataset__name="npz:/nonexistent.npz"),
                                  tmp_path / "w")
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / checkpoint.METADATA_FILE).write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    certify_job.run_certification(tiny_config(str(corrupt), score_path), tmp_path / "w")
  wrong_clf, wrong_score = make_exports(tmp_path / "rgb", (32, 32, 3))
  with pytest.raises(ValueError, match=r"shape \(8, 8, 1\) but the classifier .* expects \(32, 32, 3\)"):
    certify_job.run_certification(tiny_config(wrong_clf, score_path), tmp_path / "w")
  with pytest.raises(ValueError, match=r"score model .* was trained on \(32, 32, 3\)"):
    certify_job.run_certification(tiny_config(clf_path, wrong_score), tmp_path / "w")


def test_workdir_with_other_settings_is_refused(tmp_path, digits_models):
  certify_job.run_certification(tiny_config(*digits_models, dataset__max=2), tmp_path)
  with pytest.raises(records.WorkdirMismatchError, match="sigma: stored 0.25, now 0.5"):
    certify_job.run_certification(tiny_config(*digits_models, noise__sigma=0.5), tmp_path)
  stored = json.loads((tmp_path / records.JOB_FILE).read_text())
  assert stored["sigma"] == 0.25
  # More images (Cohen's --max) is a legitimate extension of the same run.
  recs = certify_job.run_certification(tiny_config(*digits_models, dataset__max=3), tmp_path)
  assert [r["idx"] for r in recs] == [0, 1, 2]


@pytest.mark.parametrize("config_file", ["configs/certify_cifar10.py", "configs/certify_imagenet.py"])
def test_tiny_variants_of_the_dataset_configs_run_under_mock_data(tmp_path, config_file):
  clf_path, score_path = make_exports(tmp_path, (32, 32, 3))
  config = load_config(config_file, "tiny")
  with config.unlocked():
    config.classifier.path, config.denoiser.score = clf_path, score_path
  with tfds.testing.mock_data(num_examples=3):
    recs = certify_job.run_certification(config, tmp_path / "w")
  assert [r["idx"] for r in recs] == [0, 1] and report.check(recs) == []


def test_score_specs_go_to_their_loaders(monkeypatch):
  from scoresmooth_jax.modelio import pretrained
  seen = []
  monkeypatch.setattr(pretrained, "load_score_sde_from_spec",
                      lambda spec, compute_dtype: (seen.append((spec, compute_dtype)) or "fn", 0.01, 50.0))
  assert score_models.load_score("score_sde:cifar10_ncsnpp_continuous:/ckpt/checkpoint_26") == "fn"
  assert score_models.load_score("score_sde:cifar10_ncsnpp_continuous:/ckpt/checkpoint_26", "bfloat16") == "fn"
  assert seen == [("score_sde:cifar10_ncsnpp_continuous:/ckpt/checkpoint_26", "float32"),
                  ("score_sde:cifar10_ncsnpp_continuous:/ckpt/checkpoint_26", "bfloat16")]


def test_batchnorm_folding_is_how_not_what(tmp_path, digits_models):
  """The job folds a ResNet's BatchNorm by default; folding changes no result and a run may resume across it."""
  config = lambda **kw: tiny_config(*digits_models, denoiser__kind="one_step", **kw)
  folded = certify_job.run_certification(config(dataset__max=4), tmp_path / "mixed")
  assert all(r["batchnorm_folded"] for r in folded)
  # The same workdir resumes unfolded: folding is excluded from the settings, like the batch size.
  mixed = certify_job.run_certification(config(dataset__max=8, classifier__fold_batchnorm=False), tmp_path / "mixed")
  assert [(r["idx"], r["batchnorm_folded"]) for r in stable(mixed)] == [(i, i < 4) for i in range(8)]
  unfolded = certify_job.run_certification(config(dataset__max=8, classifier__fold_batchnorm=False),
                                           tmp_path / "unfolded")
  drop = lambda recs: [{k: v for k, v in r.items() if k != "batchnorm_folded"} for r in recs]
  assert drop(stable(mixed)) == drop(stable(unfolded))


def test_batchnorm_folding_leaves_other_networks_alone(tmp_path, digits_models, monkeypatch):
  monkeypatch.setattr(classifier.Classifier, "foldable", property(lambda self: False))
  recs = certify_job.run_certification(tiny_config(*digits_models, dataset__max=1, denoiser__kind="one_step"),
                                       tmp_path)
  assert [r["batchnorm_folded"] for r in recs] == [False]


def test_batch_size_zero_is_chosen_from_the_memory_estimate(tmp_path, digits_models, capsys):
  config = lambda **kw: tiny_config(*digits_models, dataset__max=2, denoiser__kind="one_step", **kw)
  auto = certify_job.run_certification(config(certify__batch_size=0), tmp_path / "auto")
  chosen = auto[0]["batch_size"]
  assert f"batch size {chosen} per device (certify.batch_size=0)" in capsys.readouterr().out
  assert 1 <= chosen <= batching.DEFAULT_MAX_BATCH_SIZE and chosen & (chosen - 1) == 0  # a power of two
  # The chosen size is an ordinary batch size: the same records as asking for it by hand.
  explicit = certify_job.run_certification(config(certify__batch_size=chosen), tmp_path / "explicit")
  assert stable(auto) == stable(explicit)
  # A finished run has nothing to sample, so it compiles nothing to choose a batch size.
  again = certify_job.run_certification(config(certify__batch_size=0), tmp_path / "auto")
  assert stable(again) == stable(auto) and "batch size" not in capsys.readouterr().out


def test_sequential_certification_records_draws_and_resumes(tmp_path, digits_models):
  seq = dict(certify__sequential__enabled=True, certify__sequential__first_look=10, certify__n=160,
             denoiser__kind="none")
  config = lambda **kw: tiny_config(*digits_models, **seq, **kw)
  whole = certify_job.run_certification(config(certify__sequential__radius=0.25), tmp_path / "whole")
  looks = (20, 40, 80, 160)
  for r in whole:
    assert r["n_max"] == 160 and r["n"] in looks and r["radius"] in (0.0, 0.25) and r["n0"] == 10
  # Resumed in two parts, the records are those of one run: each image's certificate is a function of its key.
  certify_job.run_certification(config(certify__sequential__radius=0.25, dataset__max=3), tmp_path / "parts")
  parts = certify_job.run_certification(config(certify__sequential__radius=0.25), tmp_path / "parts")
  assert stable(parts) == stable(whole)
  used = sum(10 + r["n"] for r in whole) / len(whole)
  assert report.draws_summary(whole) == (f"{used:,.0f} draws per image (n0 + n), {100 * used / 170:.1f} % of fixed "
                                         "n0 + n = 170")
  # The sequential settings are part of the workdir's settings: another mode is refused, not mixed in.
  with pytest.raises(records.WorkdirMismatchError, match="sequential"):
    certify_job.run_certification(config(), tmp_path / "whole")
  fixed = certify_job.run_certification(tiny_config(*digits_models, dataset__max=2, denoiser__kind="none"),
                                        tmp_path / "fixed")
  assert all(r["n"] == r["n_max"] == 40 for r in fixed) and "100.0 %" in report.draws_summary(fixed)


@pytest.mark.parametrize("overrides,match", [
    (dict(certify__sequential__radius=0.25, certify__sequential__tolerance=0.1), "decision mode"),
    (dict(certify__sequential__max_radius=0.0), r"certify\.sequential\.max_radius=0.0"),
    (dict(certify__sequential__first_look=0), r"certify\.sequential\.first_look=0"),
    (dict(certify__sequential__radii=(0.25, -0.5)), r"certify\.sequential\.radii=-0.5"),
])
def test_bad_sequential_settings_fail_before_sampling(tmp_path, digits_models, no_sampling, overrides, match):
  with pytest.raises(ValueError, match=match):
    certify_job.run_certification(tiny_config(*digits_models, certify__sequential__enabled=True, **overrides),
                                  tmp_path)


@pytest.mark.slow
def test_a_bfloat16_denoiser_writes_the_records_of_a_float32_one(tmp_path, digits_models):
  config = lambda dtype: tiny_config(*digits_models, denoiser__kind="one_step", denoiser__compute_dtype=dtype,
                                     dataset__max=3)
  f32 = certify_job.run_certification(config("float32"), tmp_path / "f32")
  bf16 = certify_job.run_certification(config("bfloat16"), tmp_path / "bf16")
  assert [sorted(r) for r in bf16] == [sorted(r) for r in f32]
  for r in bf16:
    assert all(isinstance(c, int) for c in r["n0_counts"]) and sum(r["n0_counts"]) == r["n0"] == 10
    assert isinstance(r["count"], int) and 0 <= r["count"] <= r["n"] == 40
  # float32 is the default, so its settings omit the key and workdirs made before it resume; bfloat16 is recorded.
  assert "compute_dtype" not in json.loads((tmp_path / "f32" / records.JOB_FILE).read_text())["denoiser"]
  assert json.loads((tmp_path / "bf16" / records.JOB_FILE).read_text())["denoiser"]["compute_dtype"] == "bfloat16"
  with pytest.raises(records.WorkdirMismatchError, match="denoiser"):
    certify_job.run_certification(config("bfloat16"), tmp_path / "f32")
  with pytest.raises(ValueError, match=r"denoiser.compute_dtype='float16': choose one of"):
    certify_job.build_job(config("float16"))
  score = score_models.load_score(digits_models[1], "bfloat16")  # the loaders take the choice too
  assert score.module.dtype == jnp.bfloat16 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(score.params))
