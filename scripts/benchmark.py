"""Benchmarks certification throughput on the current backend: a Markdown table on stdout and a JSON file.

Run (5 minutes on 2 idle CPU cores, 7-8 when they are shared; --imagenet adds the ResNet-50 rows):
  python scripts/benchmark.py --out runs/benchmark.json --fixtures_dir /path/to/fixtures
Quick check (seconds):
  python scripts/benchmark.py --tiny --out /tmp/benchmark_tiny.json
The full OpenAI diffusion presets (random weights) one-step + classifier in sample_counts, weights as program
constants and as arguments, one fresh process per row (the 256x256 ADM takes minutes to compile on CPU):
  python scripts/benchmark.py --openai_presets --out runs/benchmark_openai.json
ViT-B/16 at 224 (Carlini et al.'s CIFAR-10 classifier, random weights): its forward pass, and one-step iDDPM + resize +
ViT-B/16 inside sample_counts (benchmarks.vit_rows; --batch_size sets the per-device batch, default 4):
  python scripts/benchmark.py --vit --out runs/benchmark_vit.json
The GPU preset (benchmarks.gpu_preset: iDDPM / ADM one-step + ResNet rows in float32 and bfloat16 inside sample_counts
at the job's batch, beside the PyTorch peer run as Carlini et al. run it; one process per row, results written before
--deadline_s; --tiny runs every row with tiny networks on a CPU):
  timeout 480 python scripts/benchmark.py --gpu_preset --peers_dir PEERS --out runs/benchmark_gpu.json
where PEERS holds openai/improved-diffusion's improved_diffusion package.

All logic lives in the ``benchmarks`` package beside ``scoresmooth_jax`` (not installed with the wheel; see its
docstring for what each row measures and how).
XLA flags are read when JAX starts its backend, so --xla_flags is applied before JAX is imported.
"""

import os
import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: benchmarks/ is not installed

_OUT = flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON results.")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny models and n: checks that everything runs, measures nothing useful.")
_IMAGENET = flags.DEFINE_bool("imagenet", False, "Also benchmark the ImageNet ResNet-50.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Per-device batch size of the classifier rows (default 64).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Interleaved repetitions per comparison (default 5).")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch eager baseline when torch is installed.")
_SWEEP = flags.DEFINE_list("torch_sweep_batch_sizes", None, "More batch sizes at which PyTorch and JAX are compared "
                           "(default 32,128,400; an empty string for none).")
_OPENAI = flags.DEFINE_bool("openai_presets", False, "Only the OpenAI diffusion preset rows (benchmarks.openai_rows), "
                            "instead of the default benchmark.")
_OPENAI_ONLY = flags.DEFINE_list("openai_preset_names", None, "Which presets (default: both).")
_VIT = flags.DEFINE_bool("vit", False, "Only the ViT-B/16 rows (benchmarks.vit_rows), instead of the default "
                         "benchmark.")
_GPU_PRESET = flags.DEFINE_bool("gpu_preset", False, "Only the GPU preset's rows (benchmarks.gpu_preset); with --tiny "
                                 "at toy size. --batch_size fixes the JAX rows' batch (default: the job's choice).")
_PRESET_ROWS = flags.DEFINE_list("preset_rows", None, "Which GPU preset rows (default: all, "
                                  "benchmarks.preset_rows.ROWS).")
_DEADLINE = flags.DEFINE_float("deadline_s", None, "The GPU preset's time limit in seconds (default 450; toy 600).")
_PEERS = flags.DEFINE_string("peers_dir", None, "Folder holding improved-diffusion's improved_diffusion package, for "
                             "the GPU preset's PyTorch peer rows (without it they are skipped).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense bfloat16 peak of a device the preset does not know, for MFU.")
_NCSNPP = flags.DEFINE_bool("ncsnpp", True, "Run the NCSN++ one-step row (about 20 GFLOP per image).")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure peak memory in a fresh subprocess per configuration.")
_FIXTURES = flags.DEFINE_string("fixtures_dir", None, "Directory with the trained ResNet-20 fixture and CIFAR-10 "
                                "test images, for bfloat16 agreement on a trained network.")
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags", "recommended",
    "XLA flags appended to $XLA_FLAGS before JAX starts: 'recommended' (xla_cpu.RECOMMENDED_CPU_XLA_FLAGS, "
    "unless $XLA_FLAGS already chooses the YNNPACK fusion types), 'none', or literal flags.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Imported here so that XLA_FLAGS is set before anything can start the JAX backend.
  # pylint: disable=import-outside-toplevel
  import benchmarks
  from scoresmooth_jax.runtime import xla_cpu

  if _XLA_FLAGS.value == "recommended":
    xla_cpu.apply_recommended_cpu_flags()
  elif _XLA_FLAGS.value != "none":
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), _XLA_FLAGS.value) if f)
  if _GPU_PRESET.value:
    from benchmarks import gpu_preset

    results = gpu_preset.run_from_flags(toy=_TINY.value, out=_OUT.value, rows=_PRESET_ROWS.value,
                                        deadline_s=_DEADLINE.value, peers_dir=_PEERS.value, batch_size=_BATCH.value,
                                        repeats=_REPEATS.value, peak_tflops=_PEAK.value,
                                        log=lambda line: print(f"# {line}", flush=True))
    print(gpu_preset.markdown(results))
    print(f"\nJSON: {os.path.abspath(_OUT.value)}")
    return
  overrides = {k: v for k, v in dict(batch_size=_BATCH.value, repeats=_REPEATS.value).items() if v is not None}
  overrides.update(torch=_TORCH.value, memory=_MEMORY.value, imagenet=_IMAGENET.value, fixtures_dir=_FIXTURES.value)
  if _SWEEP.value is not None:
    try:
      overrides["torch_sweep_batch_sizes"] = tuple(int(b) for b in _SWEEP.value)
    except ValueError as err:
      raise app.UsageError(f"--torch_sweep_batch_sizes={','.join(_SWEEP.value)}: give integers, e.g. "
                           "32,128,400") from err
  if _OPENAI.value:
    from benchmarks import openai_rows  # pylint: disable=import-outside-toplevel

    names = tuple(_OPENAI_ONLY.value or openai_rows.DEFAULT_BATCH)
    rows = openai_rows.openai_rows(names, log=lambda line: print(f"# {line}", flush=True))
    benchmarks.write_json({"openai_presets": rows, "environment": benchmarks.environment()}, _OUT.value)
    print(openai_rows.markdown(rows))
    print(f"\nJSON: {os.path.abspath(_OUT.value)}")
    return
  if _VIT.value:
    from benchmarks import vit_rows  # pylint: disable=import-outside-toplevel

    rows = vit_rows.vit_rows(_BATCH.value or vit_rows.DEFAULT_BATCH, _REPEATS.value or 3,
                             log=lambda line: print(f"# {line}", flush=True))
    benchmarks.write_json({"vit": rows, "environment": benchmarks.environment()}, _OUT.value)
    print(vit_rows.markdown(rows))
    print(f"\nJSON: {os.path.abspath(_OUT.value)}")
    return
  if _TINY.value:
    config = benchmarks.tiny_config(**overrides)
  else:
    config = benchmarks.BenchmarkConfig(ncsnpp=_NCSNPP.value, **overrides)
  results = benchmarks.run_benchmark(config, log=lambda line: print(f"# {line}", flush=True))
  benchmarks.write_json(results, _OUT.value)
  print(benchmarks.markdown_table(results))
  print(f"\nJSON: {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  app.run(main)
