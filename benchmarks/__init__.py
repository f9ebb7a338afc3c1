"""Benchmarks of the certification pipeline on the current JAX backend: samples/s, achieved FLOP/s, peak memory.

``run_benchmark(config)`` measures, in one process and at one per-device batch size B unless a row says otherwise:
  a      the raw jitted classifier forward pass on a batch of noisy images (CIFAR ResNet-110, option-B shortcuts as
         in Cohen et al.; random weights), float32, float32 with BatchNorm folded, bfloat16 folded;
  b      the same classifiers inside ``smoothing.sample_counts`` (noise, forward, argmax, counts kept on device),
         with the ratio b / a (target >= 0.95);
  torch  the PyTorch eager loop of ``torch_baseline`` on the same weights, when torch imports, against
         sample_counts at the same n: at B (PyTorch on 1 and on all threads), then at each of
         ``torch_sweep_batch_sizes`` (rows ``sweep.*``); JAX / PyTorch compares each side at its fastest batch
         size (targets: float32 >= 1.0, bfloat16 >= 1.2), and the target's note lists the ratio at each equal
         batch size;
  parts  where the time goes: the float32 folded ResNet cut into stem, layer1, layer2, layer3 and head
         (``stages``), each timed on its own in JAX and in PyTorch on the same weights and activations;
  c      one-step (Tweedie) denoiser (a ScoreUNet) + classifier, raw and inside sample_counts (>= 0.95), and the
         full score_sde NCSN++ preset ``cifar10_ncsnpp_continuous`` + ResNet-110 (random weights, small n);
  d      the annealed denoiser (L levels x T steps) + classifier inside sample_counts, against the cost of
         L * T score forwards + one classifier forward measured on their own (target <= 1.1);
  e      one score-training step (``train_state`` + ``losses``, as ``train.py`` builds it);
  mem    sample_counts of a small classifier at n = 1,000 and n = 100,000 (target: peak memory within 10 %);
  imagenet  (``imagenet=True``) ImageNet ResNet-50 rows a and b.
It also measures bfloat16's label agreement with float32 on the same noisy batches and picks a batch size with
``batching.auto_batch_size``.

How it measures, and why:
  * Time: every variant is compiled and run once first; then the variants compared with each other run
    interleaved (A, B, C, A, B, C, ...) ``repeats`` times, and each row reports the median with its spread
    (max - min) / median. The machine may be shared, and interleaving keeps ratios fair while speed drifts.
  * FLOPs: XLA's cost analysis of the compiled single-batch program (per device). XLA counts a loop's body once,
    so looping rows (sample_counts, annealed, PyTorch) take the FLOPs of their single-batch parts.
  * Precision: each forward row counts its compiled program's convolutions and dots by the element type they
    multiply in (``precision.compute_types``, in ``compute_types``), and the JAX / PyTorch targets' notes say it:
    asking for bfloat16 does not make XLA keep it (on CPU, jaxlib 0.10 runs bfloat16 convolutions in float32).
  * Peak memory: each configuration runs again in a fresh subprocess, so no earlier row's buffers or caches
    count. Accelerators: ``memory_stats()["peak_bytes_in_use"]``. CPU (where memory_stats is None): the peak RSS
    (VmHWM) of the measured call, after compilation and one warm-up call, with the high-water mark reset through
    ``/proc/self/clear_refs`` and glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed buffers leave
    the RSS; reported as growth over the RSS before the call, beside the whole process's peak. Without
    clear_refs it falls back to ``ru_maxrss`` (lifetime peak, compilation included) and says so.
"""

# The modules: ``config`` (what to run), ``measure`` (timing and XLA cost), ``memory`` (peak memory, in a
# subprocess), ``networks`` (models with random weights), ``cases`` (the JAX forward and sample_counts cases),
# ``torch_case`` (the PyTorch loop), ``train_case`` (the training step), ``workbench`` (every case by its id),
# ``environment`` (backend and CPU), ``stages`` (the ResNet cut into parts), ``agreement`` (bfloat16 vs float32
# labels), ``precision`` (the element types XLA compiled the convolutions and dots to), ``sections`` (the rows and
# ``run_benchmark``), ``report`` (Markdown and JSON). Beside them, the other runs of scripts/benchmark.py:
# ``openai_rows``, ``vit_rows``, ``gpu_preset`` (with ``preset_rows``, ``jax_rows``, ``torch_peer``), and
# ``bfloat16_cost`` (scripts/bfloat16_cost.py).

from benchmarks import precision
from benchmarks.cases import Case
from benchmarks.config import MIB, TARGETS, BenchmarkConfig, tiny_config
from benchmarks.environment import cpu_features, environment
from benchmarks.measure import UNCONTENDED_CORES, Timing, interleaved
from benchmarks.memory import measure_peak_memory, probe_memory_in_subprocess
from benchmarks.networks import Networks, calibrate_classifier, random_variables
from benchmarks.report import markdown_table, write_json
from benchmarks.sections import VARIANT_LABELS, run_benchmark
from benchmarks.workbench import Workbench
from scoresmooth_jax.runtime.xla_cpu import RECOMMENDED_CPU_XLA_FLAGS  # the flags every CPU script runs with

__all__ = ["precision", "MIB", "RECOMMENDED_CPU_XLA_FLAGS", "TARGETS", "BenchmarkConfig", "tiny_config",
           "cpu_features", "environment", "UNCONTENDED_CORES", "Timing", "interleaved",
           "measure_peak_memory", "probe_memory_in_subprocess", "markdown_table", "write_json", "VARIANT_LABELS",
           "run_benchmark", "Case", "Networks", "Workbench", "calibrate_classifier", "random_variables"]
