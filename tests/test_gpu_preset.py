"""The GPU benchmark preset at toy size on CPU: every row runs (the PyTorch peer too), the run keeps its deadline and
writes its results, and the MFU / ratio arithmetic is right."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accelerators, draw_rate, gpu_preset, jax_rows, preset_rows
from scoresmooth_jax.runtime import batching

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = pathlib.Path(os.environ.get("SCORESMOOTH_PEERS", ROOT / ".." / "shared" / "peers" / "openai_diffusion"))
ROW_FIELDS = ("draws_per_s", "compile_s", "s_per_image", "peak_memory_gib", "flops_per_draw", "batch_size",
              "device_kind")


@pytest.fixture(scope="module")
def peers_dir():
  pytest.importorskip("torch", reason="the PyTorch peer needs PyTorch (pip install torch==2.13.0)")
  if not (PEERS / "improved_diffusion" / "unet.py").is_file():
    pytest.skip(f"improved-diffusion's code not found at {PEERS} (set SCORESMOOTH_PEERS)")
  return str(PEERS.resolve())


def test_peaks_by_device_kind_and_mfu():
  kinds = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H200": 989.0,
           "NVIDIA H200 NVL": 835.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
           "TPU v5 lite": 197.0, "TPU v5p": 459.0, "cpu": None, "NVIDIA L4": None, None: None}
  assert {kind: accelerators.dense_bf16_peak_tflops(kind) for kind in kinds} == kinds
  # 15.7 GFLOP per draw at 10,000 draws/s is 157 TFLOP/s, 15.9 % of 989.
  assert accelerators.achieved_tflops(15.7e9, 10_000) == pytest.approx(157.0)
  assert accelerators.mfu(15.7e9, 10_000, 989.0) == pytest.approx(157.0 / 989.0)
  assert accelerators.mfu(15.7e9, 10_000, None) is None and accelerators.mfu(float("nan"), 1.0, 989.0) is None


class _FakeClock:
  """A clock that only the counting loop advances: a known rate, whatever else the machine is doing."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_draw_rate_of_a_known_loop_and_at_a_passed_deadline():
  per_draw, compile_s = 2.0**-12, 2.0  # binary fractions: the fake times add up exactly
  clock, calls = _FakeClock(), []

  def count(num):
    clock.now += num * per_draw + (compile_s if not calls else 0.0)  # the first call also compiles
    calls.append(num)

  timing = draw_rate.time_draws(count, 50, target_s=0.05, repeats=3, clock=clock)
  # one steady round takes 50 / 4096 = 0.0122 s, so 5 rounds make the 0.05 s target
  assert calls == [50, 50, 250, 250, 250]
  assert timing["timed_calls"] == 3 and timing["rounds_per_call"] == 5 and timing["spread"] == pytest.approx(0.0)
  assert timing["draws_per_s"] == pytest.approx(1 / per_draw) and timing["compile_s"] == pytest.approx(compile_s)
  clock, calls = _FakeClock(), []
  late = draw_rate.time_draws(count, 50, target_s=0.05, repeats=3, deadline=clock.now - 1.0, clock=clock)
  assert late["timed_calls"] == 0 and late["draws_per_s"] == pytest.approx(1 / per_draw)


def test_the_memory_estimate_counts_lifted_weights_once():
  # A classifier closing over 4 MiB of weights: the estimate holds them (as arguments, not copied constants).
  weights = jnp.ones((4 * 2**20 // 4,), jnp.float32)
  clf = lambda x: jnp.sum(x, axis=(1, 2, 3))[:, None] * weights[:10][None, :] + weights[-1]
  assert batching.estimate_step_memory(clf, (8, 8, 3), 4) >= weights.nbytes
  step, lifted = batching._step(clf, (8, 8, 3), 4)  # pylint: disable=protected-access
  assert [tuple(w.shape) for w in lifted] == [weights.shape]
  assert step([weights], jax.random.key(0)).shape == (4,)


def _rows(framework, heavy):
  cheap = {"jax.none.resnet20.float32", "jax.none.resnet20.bfloat16", "jax.cifar10-cpu.resnet20.float32",
           "jax.cifar10-cpu.resnet20.bfloat16", "torch.iddpm_cifar10.resnet110.eager",
           "torch.iddpm_cifar10.resnet110.autocast"}
  return [pytest.param(r, id=r.name, marks=[pytest.mark.slow] if heavy else [])
          for r in preset_rows.ROWS if r.framework == framework and (r.name not in cheap) == heavy]


def _check_row(row, spec, settings):
  assert row["name"] == spec.name and row["precision"] == spec.precision and "error" not in row
  assert all(row[k] is not None for k in ROW_FIELDS), row
  assert row["draws_per_s"] > 0 and row["flops_per_draw"] > 0 and row["compile_s"] >= 0
  assert row["s_per_image"] == pytest.approx((settings.n0 + settings.n) / row["draws_per_s"])


@pytest.mark.parametrize("spec", _rows("jax", False) + _rows("jax", True))
def test_every_jax_row_runs_at_toy_size(spec):
  settings = preset_rows.PresetSettings.toy_settings(batch_size=4, target_s=0.01, repeats=1)
  _check_row(jax_rows.measure_jax_row(spec, settings), spec, settings)


def test_a_jax_row_takes_the_jobs_batch_size():
  spec = preset_rows.select_rows(["jax.none.resnet20.float32"])[0]
  settings = preset_rows.PresetSettings.toy_settings(max_batch_size=4, probe_sizes=(1, 2), target_s=0.01,
                                                     repeats=1)
  row = jax_rows.measure_jax_row(spec, settings)
  _check_row(row, spec, settings)
  assert row["batch_source"].startswith("job") and row["batch_size"] == 4 and row["estimated_step_gib"] > 0


def test_flops_are_counted_on_xla_convolutions_whatever_runs_them():
  # A folded ResNet may run on oneDNN custom calls that XLA's cost analysis counts as -1 FLOP each.
  settings = preset_rows.PresetSettings.toy_settings()
  clf = jax_rows.build_classifier("resnet20", settings, "float32", "xla")
  flops = jax_rows.lowered_flops(clf, 2, (8, 8, 3)) / 2
  stem_only = 2 * 8 * 8 * 3 * 9 * 4  # the 3x3 stem alone, 3 -> 4 channels on 8 x 8, padding taps included
  assert stem_only / 2 < flops < 50 * stem_only


@pytest.mark.parametrize("spec", _rows("torch", False) + _rows("torch", True))
def test_every_peer_row_runs_at_toy_size(spec, peers_dir):
  from benchmarks import torch_peer

  settings = preset_rows.PresetSettings.toy_settings(peers_dir=peers_dir, target_s=0.01, repeats=1)
  row = torch_peer.measure_torch_row(spec, settings)
  _check_row(row, spec, settings)
  assert row["timestep"] >= 1 and row["torch_flops_per_draw"] == row["flops_per_draw"]


def test_the_peer_needs_its_code(tmp_path):
  pytest.importorskip("torch", reason="the PyTorch peer needs PyTorch")
  from benchmarks import torch_peer

  with pytest.raises(FileNotFoundError, match="holds no improved_diffusion/unet.py"):
    torch_peer.import_improved_diffusion(str(tmp_path))


def test_ratios_and_mfu_of_finished_rows():
  settings = preset_rows.PresetSettings.full()
  kind = "NVIDIA H100 80GB HBM3"
  pair = "iddpm_cifar10+resnet110"
  rows = [{"name": "a", "framework": "jax", "precision": "float32", "pair": pair, "draws_per_s": 4000.0,
           "flops_per_draw": 15e9, "device_kind": kind},
          {"name": "b", "framework": "jax", "precision": "bfloat16", "pair": pair, "draws_per_s": 12000.0,
           "flops_per_draw": 15.1e9, "device_kind": kind},
          {"name": "c", "framework": "torch", "precision": "float32", "pair": pair, "torch_variant": "eager",
           "draws_per_s": 2000.0, "flops_per_draw": 17e9, "device_kind": kind},
          {"name": "d", "framework": "torch", "precision": "bfloat16", "pair": pair, "torch_variant": "autocast",
           "draws_per_s": 3000.0, "flops_per_draw": 17e9, "device_kind": kind},
          {"name": "e", "framework": "jax", "pair": "resnet20", "precision": "float32", "skipped": "deadline"}]
  gpu_preset.finish(rows, settings)
  assert rows[2]["flops_per_draw"] == 15e9 and rows[2]["flops_source"] == "XLA count of the same networks"
  assert rows[1]["mfu"] == pytest.approx(15.1e9 * 12000 / 1e12 / 989.0)
  assert rows[1]["vs_peer_eager"] == pytest.approx(6.0) and rows[1]["vs_peer_best"] == pytest.approx(4.0)
  assert "mfu" not in rows[4]


def test_a_run_past_its_deadline_reports_every_row_and_writes_its_file(tmp_path):
  settings = preset_rows.PresetSettings.toy_settings(deadline_s=1.0)
  out = tmp_path / "run.json"
  results = gpu_preset.run_preset(settings, str(out), log=lambda line: None)
  assert [r["name"] for r in results["rows"]] == preset_rows.row_names()
  assert all("skipped" in r for r in results["rows"])  # no peers_dir for the torch rows, no time for the others
  assert json.loads(out.read_text())["rows"] == results["rows"]
  assert "jax.iddpm_cifar10.resnet110.bfloat16" in gpu_preset.markdown(results)
  with pytest.raises(ValueError, match="unknown preset rows"):
    preset_rows.select_rows(["jax.nothing"])


@pytest.mark.slow
def test_the_script_runs_the_toy_preset_in_fresh_processes(tmp_path, peers_dir):
  """``scripts/benchmark.py --gpu_preset --tiny``, the command a GPU runs without --tiny, on two rows."""
  out = tmp_path / "gpu.json"
  rows = "jax.none.resnet20.bfloat16,torch.iddpm_cifar10.resnet110.eager"
  done = subprocess.run([sys.executable, "scripts/benchmark.py", "--gpu_preset", "--tiny", f"--preset_rows={rows}",
                         f"--peers_dir={peers_dir}", f"--out={out}", "--deadline_s=300"], cwd=ROOT, timeout=400,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  results = json.loads(out.read_text())
  assert [r["name"] for r in results["rows"]] == [r.name for r in preset_rows.select_rows(rows.split(","))]
  assert all(r["draws_per_s"] > 0 for r in results["rows"]), results["rows"]
  assert "| jax.none.resnet20.bfloat16 |" in done.stdout and results["wall_s"] < 300
  eager = next(r for r in results["rows"] if r["name"].startswith("torch"))
  assert eager["vs_peer_eager"] == pytest.approx(1.0) and np.isfinite(eager["flops_per_draw"])
