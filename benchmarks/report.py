"""Output of a benchmark run: the results as a Markdown table (rows, then the targets, agreement and auto batch
size) and as a JSON file.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks.config import MIB
from benchmarks.measure import UNCONTENDED_CORES

def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "-"
  return f"{value / scale if scale != 1.0 else value:{spec}}{suffix}"


def markdown_table(results: dict) -> str:
  """The rows as a Markdown table, then the targets, agreement and auto batch size."""
  env = results["environment"]
  lines = [f"Backend: {env['backend']} ({env['device_kind']}) x{env['devices']}, jax {env['jax']}, "
           f"XLA_FLAGS={env['xla_flags']!r}, CPU: {env['cpu']['model']}"]
  if env.get("threads"):
    lines.append(f"Threads: {env['threads']}")
  lines += ["", "samples/s: median / fastest call (spread = (max - min) / median of the interleaved calls); "
                f"others: median cores other processes kept busy during the calls (< {UNCONTENDED_CORES} counts as "
                "uncontended). GFLOP/s from the median.",
            "", "| row | B/dev | samples/s median / best (spread) | others | GFLOP/sample | GFLOP/s | "
                "peak mem growth / process (MiB) | XLA est. (MiB) | ratio | vs |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    rate = ("-" if r["samples_per_s"] is None else
            f"{r['samples_per_s']:.1f} / {r['best_samples_per_s']:.1f} ({100 * r['spread']:.0f}%)")
    memory = ("-" if r["peak_memory_bytes"] is None
              else f"{r['peak_memory_growth_bytes'] / MIB:.1f} / {r['peak_memory_bytes'] / MIB:.0f}")
    lines.append(f"| {r['id']}: {r['description']} | {_fmt(r['batch_size'], 'd')} | {rate} | "
                 f"{_fmt(r['contention_cores'], '.2f')} | {_fmt(r['flops_per_sample'], '.3f', 1e9)} | "
                 f"{_fmt(r['achieved_flops_per_s'], '.1f', 1e9)} | "
                 f"{memory} | {_fmt(r['xla_memory_bytes'], '.1f', MIB)} | {_fmt(r['ratio'], '.3f')} | "
                 f"{r['ratio_to'] or ''} |")
  lines += ["", "| target | value | required | met | note |", "|---|---|---|---|---|"]
  for name, t in results["targets"].items():
    met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
    lines.append(f"| {name} | {_fmt(t['value'], '.4f')} | {t['target']} | {met} | {t['note']} |")
  agreement = results["agreement"]
  lines += ["", "bfloat16 vs float32 labels on the same noisy samples:"]
  for key in ("random_resnet", "trained_resnet20"):
    if key in agreement:
      a = agreement[key]
      lines.append(f"  {a['classifier']}: {100 * a['agreement']:.2f} % of {a['samples']} "
                   f"(mean top-class share {100 * a['mean_top_class_fraction']:.1f} %)")
  lines.append(f"  same-key sample_counts, total variation between the count vectors: "
               f"{_fmt(agreement['same_key_counts_total_variation'], '.4f')}; BN folded vs unfolded labels: "
               f"{100 * agreement['folded_vs_unfolded']['agreement']:.2f} %")
  auto = results["auto_batch_size"]
  lines.append(f"Auto batch size for a {auto['budget_bytes'] / MIB:.0f} MiB budget: {auto['batch_size']} "
               f"(XLA estimate {auto['estimated_bytes'] / MIB:.1f} MiB; line {auto['fixed_bytes'] / MIB:.1f} MiB + "
               f"{auto['bytes_per_sample'] / MIB:.3f} MiB/sample; at B={results['config']['batch_size']}: "
               f"{auto['estimated_bytes_at_benchmark_batch'] / MIB:.1f} MiB)")
  if results.get("ncsnpp"):
    n = results["ncsnpp"]
    lines.append(f"NCSN++ {n['preset']}: {n['params']:,} params, "
                 f"{n['flops_per_image_denoiser_plus_classifier'] / 1e9:.2f} GFLOP/image with the classifier "
                 f"({n['flops_per_image_classifier'] / 1e9:.3f} of them the classifier), "
                 f"{n['samples_per_s_sample_counts']:.2f} samples/s in sample_counts")
  lines += [f"Note: {note}" for note in results["notes"]]
  lines.append(f"Wall time: {results['wall_seconds']:.0f} s")
  return "\n".join(lines)


def write_json(results: dict, path) -> None:
  """Writes ``results`` as JSON (numpy scalars made plain)."""
  def plain(value):
    if isinstance(value, dict):
      return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
      return value.tolist()
    if isinstance(value, np.generic):
      return value.item()
    if isinstance(value, float) and not np.isfinite(value):
      return None
    return value

  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(plain(results), f, indent=2)
