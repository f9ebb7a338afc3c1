"""The GPU benchmark preset: every row of ``preset_rows.ROWS`` in its own process, inside one deadline.

``run_preset(settings, out_path)`` runs the rows one after the other, each in a fresh Python process
(``row_main``) so that its peak memory is its own and the JAX rows' allocator and PyTorch's never share a device,
and writes the JSON file after every row: a run stopped at any moment leaves the rows it finished. A row starts
only while enough of ``settings.deadline_s`` is left, its process gets at most what is left (and at most its
``max_s``), and inside it the timing shrinks to fit (``draw_rate``); a row that cannot start or is stopped is
reported with the reason, so the run ends before its deadline with every row accounted for.

For each row (``jax_rows``, ``torch_peer``): draws/s inside the counting loop at the row's batch, achieved
TFLOP/s and MFU against the chip's dense bfloat16 peak (``accelerators``), peak memory, compile time, seconds per
image at n0 + n draws, and its ratio to the PyTorch peer run eagerly (Carlini et al.'s way) and to the peer's
fastest variant. The PyTorch rows are compared on the FLOPs XLA counts for the same networks (the JAX float32 row
of the same pair), so every row of a pair is divided by the same work; PyTorch's own count is kept beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback

from benchmarks import accelerators, preset_rows

_MIN_ROW_S = 20.0  # a row needs at least this long (process start, build, compile) to be worth starting
_MARGIN_S = 5.0    # kept back from the deadline for writing the results


def row_main(spec_json: str, settings_json: str, deadline_s: str) -> None:
  """Entry point of a row's process: measures one row and prints it as one JSON line (an error as a row too)."""
  spec = preset_rows.RowSpec(**json.loads(spec_json))
  raw = json.loads(settings_json)
  settings = preset_rows.PresetSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
  deadline = time.monotonic() + float(deadline_s)
  try:
    if spec.framework == "jax":
      from benchmarks import jax_rows  # pylint: disable=import-outside-toplevel
      row = jax_rows.measure_jax_row(spec, settings, deadline)
    else:
      from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel
      row = torch_peer.measure_torch_row(spec, settings, deadline)
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    row = {"name": spec.name, "framework": spec.framework, "precision": spec.precision, "pair": spec.pair,
           "error": f"{type(error).__name__}: {error}"}
  print(json.dumps(row, default=str), flush=True)


def run_row_in_subprocess(spec: preset_rows.RowSpec, settings: preset_rows.PresetSettings, timeout: float) -> dict:
  """``row_main`` in a fresh Python process, stopped after ``timeout`` seconds; its row, or the reason it has none."""
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is beside scoresmooth_jax/
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
  code = "import sys; from benchmarks import gpu_preset; gpu_preset.row_main(*sys.argv[1:])"
  args = [sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec)), json.dumps(dataclasses.asdict(settings)),
          str(max(timeout - _MARGIN_S, 1.0))]
  base = {"name": spec.name, "framework": spec.framework, "precision": spec.precision, "pair": spec.pair}
  try:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=repo_root)
  except subprocess.TimeoutExpired:
    return {**base, "error": f"stopped after {timeout:.0f} s (the row's limit or the run's deadline)"}
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if lines:
    row = json.loads(lines[-1])
    if "error" in row and done.stderr:
      row["traceback_tail"] = done.stderr.strip().splitlines()[-6:]
    return row
  tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
  return {**base, "error": f"exit {done.returncode}: {' | '.join(tail)}"}


def finish(rows: list[dict], settings: preset_rows.PresetSettings) -> list[dict]:
  """Adds achieved TFLOP/s, MFU and the ratios to the peer to every measured row (module docstring)."""
  jax_flops = {}
  for row in rows:
    if row.get("framework") == "jax" and row.get("precision") == "float32" and row.get("flops_per_draw"):
      jax_flops.setdefault(row["pair"], row["flops_per_draw"])
  peer = {r["torch_variant"]: r["draws_per_s"] for r in rows if r.get("framework") == "torch" and "draws_per_s" in r}
  for row in rows:
    if "draws_per_s" not in row:
      continue
    if row["framework"] == "torch" and row["pair"] in jax_flops:
      row["flops_per_draw"], row["flops_source"] = jax_flops[row["pair"]], "XLA count of the same networks"
    else:
      row.setdefault("flops_source", "XLA count" if row["framework"] == "jax" else "torch FlopCounterMode")
    peak = settings.peak_tflops or accelerators.dense_bf16_peak_tflops(row.get("device_kind"))
    row["peak_bf16_tflops"] = peak
    row["achieved_tflops"] = accelerators.achieved_tflops(row.get("flops_per_draw"), row["draws_per_s"])
    row["mfu"] = accelerators.mfu(row.get("flops_per_draw"), row["draws_per_s"], peak)
    if row["pair"] == "iddpm_cifar10+resnet110" and peer:
      row["vs_peer_eager"] = row["draws_per_s"] / peer["eager"] if "eager" in peer else None
      row["vs_peer_best"] = row["draws_per_s"] / max(peer.values())
  return rows


def run_preset(settings: preset_rows.PresetSettings, out_path: str, rows=preset_rows.ROWS, log=print) -> dict:
  """Runs ``rows`` (module docstring) and returns the results, also written to ``out_path`` after every row."""
  start = time.monotonic()
  deadline = start + settings.deadline_s
  results = {"preset": "toy" if settings.toy else "gpu", "settings": dataclasses.asdict(settings), "rows": []}

  def write():
    results["wall_s"] = time.monotonic() - start
    finish(results["rows"], settings)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
      json.dump(results, f, indent=1, default=str)
    os.replace(out_path + ".tmp", out_path)  # never a half-written file

  for spec in rows:
    left = deadline - time.monotonic() - _MARGIN_S
    if spec.framework == "torch" and not settings.peers_dir:
      row = {"name": spec.name, "framework": "torch", "precision": spec.precision, "pair": spec.pair,
             "skipped": "no --peers_dir (the folder holding improved-diffusion's improved_diffusion package)"}
    elif left < _MIN_ROW_S:
      row = {"name": spec.name, "framework": spec.framework, "precision": spec.precision, "pair": spec.pair,
             "skipped": f"the run's deadline ({settings.deadline_s:.0f} s) left {max(left, 0):.0f} s"}
    else:
      timeout = min(spec.max_s * settings.row_time_scale, left)
      log(f"{spec.name}: up to {timeout:.0f} s ({left:.0f} s left)")
      row = run_row_in_subprocess(spec, settings, timeout)
    results["rows"].append(row)
    write()
    log(json.dumps({k: row.get(k) for k in ("name", "batch_size", "draws_per_s", "compile_s", "error", "skipped")
                    if k in row}))
  write()
  return results


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return "" if value is None else format(value * scale, spec)


def markdown(results: dict) -> str:
  """The rows as a Markdown table, with the device and the run's wall time under it."""
  lines = ["| row | batch | draws/s | s / image (n0 + n) | TFLOP/s | MFU | peak memory GiB | compile s | "
           "vs peer eager | vs peer best |", "|---|---|---|---|---|---|---|---|---|---|"]
  devices = set()
  for r in results["rows"]:
    if "draws_per_s" not in r:
      lines.append(f"| {r['name']} | | {r.get('error') or r.get('skipped')} | | | | | | | |")
      continue
    devices.add(r.get("device_kind"))
    lines.append(f"| {r['name']} | {r['batch_size']} | {r['draws_per_s']:,.0f} | {r['s_per_image']:.1f} | "
                 f"{_fmt(r.get('achieved_tflops'), '.3g')} | {_fmt(r.get('mfu'), '.1%')} | "
                 f"{_fmt(r.get('peak_memory_gib'), '.2f')} | {r['compile_s']:.1f} | "
                 f"{_fmt(r.get('vs_peer_eager'), '.2f')} | {_fmt(r.get('vs_peer_best'), '.2f')} |")
  settings = results["settings"]
  lines.append(f"\nDevice: {', '.join(sorted(str(d) for d in devices)) or 'none measured'}; n0 + n = "
               f"{settings['n0']} + {settings['n']:,}; sigma {settings['sigma']}; wall {results['wall_s']:.0f} s "
               f"of a {settings['deadline_s']:.0f} s deadline.")
  return "\n".join(lines)


def run_from_flags(*, toy: bool, out: str, rows=None, deadline_s: float | None = None, peers_dir: str | None = None,
                   batch_size: int | None = None, repeats: int | None = None, peak_tflops: float | None = None,
                   log=print) -> dict:
  """``run_preset`` with the settings ``scripts/benchmark.py --gpu_preset`` gives (None: the preset's default)."""
  overrides = dict(deadline_s=deadline_s, peers_dir=peers_dir, batch_size=batch_size, repeats=repeats,
                   peak_tflops=peak_tflops)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  settings = (preset_rows.PresetSettings.toy_settings if toy else preset_rows.PresetSettings.full)(**overrides)
  return run_preset(settings, out, preset_rows.select_rows(rows), log=log)
