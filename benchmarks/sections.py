"""The rows of a benchmark run: each ``_*_section`` times one group of cases (interleaved) and adds rows, targets
and notes to ``_Results``; ``run_benchmark(config)`` runs them all and returns the results as a JSON-ready dict
(see ``benchmarks`` for what each row measures and how).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np

from benchmarks import precision, stages, torch_baseline
from benchmarks.agreement import fixture_agreement, labels_agreement
from benchmarks.cases import Case
from benchmarks.config import MIB, TARGETS, BenchmarkConfig
from benchmarks.environment import environment
from benchmarks.measure import UNCONTENDED_CORES, Timing, compiled_flops, interleaved, median, spread
from benchmarks.memory import probe_memory_in_subprocess
from benchmarks.workbench import Workbench
from scoresmooth_jax import smoothing
from scoresmooth_jax.runtime import batching
from scoresmooth_jax.runtime.xla_cpu import xla_cpu_threads


def _row(row_id: str, description: str, case: Case | None, timing: Timing | None = None, name: str | None = None,
         **extra) -> dict:
  row = {"id": row_id, "description": description, "batch_size": None, "samples_per_call": None,
         "samples_per_s": None, "spread": None, "flops_per_sample": None, "flops_source": None,
         "achieved_flops_per_s": None, "compile_seconds": None, "xla_memory_bytes": None,
         "peak_memory_growth_bytes": None, "peak_memory_bytes": None, "memory_method": None, "ratio": None,
         "ratio_to": None, "best_samples_per_s": None, "contention_cores": None, "uncontended_samples_per_s": None,
         "uncontended_repeats": None, "compute_types": None, "note": ""}
  if case is not None and timing is not None:
    seconds, others = timing.seconds[name or row_id], timing.others_cores[name or row_id]
    rate = case.samples / median(seconds)
    quiet = [t for t, o in zip(seconds, others or ()) if o < UNCONTENDED_CORES]
    row.update(contention_cores=None if others is None else median(others), uncontended_repeats=len(quiet),
               uncontended_samples_per_s=case.samples / median(quiet) if quiet else None)
    row.update(batch_size=case.batch_size, samples_per_call=case.samples, samples_per_s=rate,
               best_samples_per_s=case.samples / min(seconds),
               spread=spread(seconds), flops_per_sample=case.flops_per_sample, flops_source=case.flops_source,
               achieved_flops_per_s=rate * case.flops_per_sample, compile_seconds=case.compile_seconds,
               xla_memory_bytes=case.xla_bytes, compute_types=case.compute_types)
  row.update(extra)
  return row


def _target(name: str, value, note: str = "") -> dict:
  op, threshold = TARGETS[name]
  if value is None or not np.isfinite(value):
    met = None
  elif op == ">=":
    met = bool(value >= threshold)
  elif op == "<=":
    met = bool(value <= threshold)
  else:
    met = bool(abs(value - 1.0) <= threshold)
  return {"value": value, "target": f"{op} {threshold}" if op != "within" else f"within {threshold:.0%} of 1",
          "met": met, "note": note}


VARIANT_LABELS = {"f32": "float32", "f32_folded": "float32, BN folded", "bf16_folded": "bfloat16, BN folded"}


@dataclasses.dataclass
class _Results:
  """What the sections of a run add to."""

  bench: Workbench
  env: dict
  log: Callable[[str], None]
  rows: list = dataclasses.field(default_factory=list)
  targets: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)

  def row(self, row_id: str) -> dict:
    return next(r for r in self.rows if r["id"] == row_id)

  def rate(self, case_id: str, timing: Timing, name: str | None = None) -> float:
    return self.bench.case(case_id).samples / median(timing.seconds[name or case_id])


def _classifier_section(res: _Results) -> None:
  """Rows a and b: the classifier's forward pass against the same classifier inside sample_counts."""
  bench, cfg = res.bench, res.bench.config
  res.log("a/b: classifier forward vs sample_counts")
  variants = cfg.classifier_variants
  timing = interleaved({f"{s}.{v}": bench.case(f"{s}.{v}").run for v in variants for s in ("a", "b")},
                       cfg.repeats)
  depth = f"ResNet-{cfg.depth}"
  for v in variants:
    res.rows.append(_row(f"a.{v}", f"(a) {depth} forward, {VARIANT_LABELS[v]}", bench.case(f"a.{v}"), timing))
    ratio = res.rate(f"b.{v}", timing) / res.rate(f"a.{v}", timing)
    res.rows.append(_row(f"b.{v}", f"(b) {depth} in sample_counts, {VARIANT_LABELS[v]}", bench.case(f"b.{v}"),
                         timing, ratio=ratio, ratio_to=f"a.{v}"))
  res.targets["sample_counts_vs_forward.classifier"] = _target(
      "sample_counts_vs_forward.classifier", min(res.row(f"b.{v}")["ratio"] for v in variants),
      f"worst of {', '.join(variants)}")
  res.extra["counts"] = {v: timing.outputs[f"b.{v}"] for v in variants}  # same key for every variant


def _torch_section(res: _Results) -> None:
  """The PyTorch eager loop against sample_counts, same weights, same n, interleaved: at batch_size (both thread
  counts of PyTorch), then at each of torch_sweep_batch_sizes. The targets compare each side at its best."""
  bench, cfg = res.bench, res.bench.config
  if not cfg.torch or res.env["torch"] is None:
    reason = "disabled" if not cfg.torch else "torch is not installed"
    res.notes.append(f"PyTorch baseline skipped: {reason}.")
    for name in ("jax_float32_vs_torch", "jax_bfloat16_vs_torch"):
      res.targets[name] = _target(name, None, reason)
    return
  res.log("torch: PyTorch eager loop vs sample_counts")
  threads = torch_baseline.configure_threads(xla_cpu_threads())
  res.env["threads"] = {"xla_cpu": xla_cpu_threads(), **threads}
  # PyTorch's OpenMP workers meet at a barrier after every operator: when another process takes one of the
  # cores, the 2-thread loop slows down many times over while 1 thread does not. Both run, and the targets
  # compare against the faster, so a shared machine cannot flatter JAX.
  torch_ids = ("torch.f32", "torch.f32_1thread")
  num = bench.case("torch.f32").samples
  fns = {t: bench.case(t).run for t in torch_ids}
  for v in cfg.classifier_variants:
    clf = bench.nets.classifier(v)
    fns[f"jax.{v}"] = (lambda clf=clf: smoothing.sample_counts(
        clf, bench.inputs.image, bench.inputs.nz, num, jax.random.key(cfg.seed + 11), num_classes=cfg.num_classes,
        batch_size=cfg.batch_size, mesh=bench.inputs.mesh))
  timing = interleaved(fns, max(3, cfg.repeats - 1))
  for t, n in zip(torch_ids, (threads["torch_intra_op_threads"], 1)):
    res.rows.append(_row(t, f"PyTorch eager MC loop, ResNet-{cfg.depth}, float32 NCHW, {n} thread(s)",
                         bench.case(t), timing))
  jax_rows = {v: _row(f"jax_vs_torch.{v}", f"sample_counts {VARIANT_LABELS[v]} vs the faster PyTorch (same n)",
                      dataclasses.replace(bench.case(f"b.{v}"), samples=num), timing, f"jax.{v}")
              for v in cfg.classifier_variants}
  sweep_torch, sweep_jax = _batch_size_sweep(res, threads["torch_intra_op_threads"])
  # Uncontended medians when every side had uncontended calls; otherwise the medians of all calls.
  compared = [res.row(t) for t in torch_ids] + list(jax_rows.values()) + list(sweep_torch.values()) + [
      row for rows in sweep_jax.values() for row in rows.values()]
  quiet = all(r["uncontended_samples_per_s"] for r in compared)
  key = "uncontended_samples_per_s" if quiet else "samples_per_s"
  best_torch = max(torch_ids, key=lambda t: res.row(t)[key])
  for v, row in jax_rows.items():
    row.update(ratio=row[key] / res.row(best_torch)[key], ratio_to=best_torch,
               ratio_of_best=row["best_samples_per_s"] / max(res.row(t)["best_samples_per_s"] for t in torch_ids))
    res.rows.append(row)
  for size, torch_row in sweep_torch.items():
    res.rows.append(torch_row)
    for v in sweep_jax:
      row = sweep_jax[v][size]
      row.update(ratio=row[key] / torch_row[key], ratio_to=torch_row["id"])
      res.rows.append(row)
  # The targets: each side at its fastest batch size (PyTorch also at its faster thread count).
  torch_all = [res.row(t) for t in torch_ids] + list(sweep_torch.values())
  torch_top = max(torch_all, key=lambda r: r[key])
  which = "uncontended medians" if quiet else "medians (no uncontended calls on some side)"
  for name, v in (("jax_float32_vs_torch", "f32_folded"), ("jax_bfloat16_vs_torch", "bf16_folded")):
    if v not in jax_rows:
      res.targets[name] = _target(name, None, f"{v} not in classifier_variants")
      continue
    jax_all = [jax_rows[v]] + list(sweep_jax.get(v, {}).values())
    jax_top = max(jax_all, key=lambda r: r[key])
    by_size = sorted(jax_all, key=lambda r: r["batch_size"])
    at_equal = ", ".join(f"B={r['batch_size']} {r['ratio']:.2f}" for r in by_size)
    note = (f"{VARIANT_LABELS[v]}, best at B={jax_top['batch_size']}, vs the best PyTorch ({torch_top['id']}, "
            f"B={torch_top['batch_size']}), {which}; at equal batch size: {at_equal}")
    if v == "f32_folded" and "f32" in jax_rows:
      note += f"; unfolded float32 at B={cfg.batch_size}: {jax_rows['f32']['ratio']:.2f}"
    # What XLA really multiplies in: on CPU a bfloat16 network's convolutions run in float32 (benchmarks.precision).
    note += f"; compiled {precision.describe(bench.case(f'a.{v}').compute_types)}"
    res.targets[name] = _target(name, jax_top[key] / torch_top[key], note)


def _batch_size_sweep(res: _Results, threads: int) -> tuple[dict, dict]:
  """The PyTorch loop and sample_counts of the folded classifiers at each of torch_sweep_batch_sizes,
  interleaved: rows ({B: torch row}, {variant: {B: JAX row}}), without ratios (the caller adds them)."""
  bench, cfg = res.bench, res.bench.config
  variants = [v for v in ("f32_folded", "bf16_folded") if v in cfg.classifier_variants]
  sizes = cfg.torch_sweep_batch_sizes
  if not sizes or not variants:
    return {}, {}
  res.log(f"torch: batch sizes {', '.join(map(str, sizes))}")
  ids = [f"sweep.torch.{b}" for b in sizes] + [f"sweep.jax.{v}.{b}" for v in variants for b in sizes]
  timing = interleaved({i: bench.case(i).run for i in ids}, max(3, cfg.repeats - 1))
  torch_rows = {b: _row(f"sweep.torch.{b}", f"PyTorch eager MC loop, float32 NCHW, {threads} thread(s), B={b}",
                        bench.case(f"sweep.torch.{b}"), timing) for b in sizes}
  jax_rows = {v: {b: _row(f"sweep.jax.{v}.{b}", f"sample_counts {VARIANT_LABELS[v]}, B={b} (same n as PyTorch)",
                          bench.case(f"sweep.jax.{v}.{b}"), timing) for b in sizes} for v in variants}
  return torch_rows, jax_rows


def _parts_section(res: _Results) -> None:
  """Where the time goes: stem, layer1-3 and head of the float32 folded ResNet, JAX and PyTorch, interleaved."""
  bench, cfg = res.bench, res.bench.config
  if not cfg.parts:
    return
  res.log("parts: the ResNet's stages on their own, JAX and PyTorch")
  clf = bench.nets.classifier("f32_folded")
  batch = cfg.batch_size * bench.inputs.devices
  images = bench.inputs.noisy_batch(cfg.batch_size)
  jax_fns = stages.jax_parts(clf)
  jax_inputs, logits = stages.run_parts(jax_fns, images)
  error = stages.check_composition(logits, clf, images, atol=1e-3)
  fns, cases = {}, {}
  for part in stages.PARTS:
    compiled = jax_fns[part].lower(jax_inputs[part]).compile()
    x = jax_inputs[part]
    fns[f"parts.jax.{part}"] = lambda compiled=compiled, x=x: compiled(x)
    cases[f"parts.jax.{part}"] = Case(run=None, warmup=None, samples=batch, batch_size=cfg.batch_size,
                                      flops_per_sample=compiled_flops(compiled) / cfg.batch_size,
                                      flops_source="XLA cost analysis")
  have_torch = cfg.torch and res.env["torch"] is not None
  if have_torch:
    torch = torch_baseline.import_torch()
    torch_baseline.configure_threads(xla_cpu_threads())
    torch_fns = stages.torch_parts(bench.nets.torch_model())
    nchw = torch.from_numpy(np.asarray(images, np.float32).transpose(0, 3, 1, 2).copy())
    torch_inputs, _ = stages.run_parts(torch_fns, nchw)
    for part in stages.PARTS:
      fns[f"parts.torch.{part}"] = lambda fn=torch_fns[part], x=torch_inputs[part]: fn(x)
      cases[f"parts.torch.{part}"] = dataclasses.replace(cases[f"parts.jax.{part}"],
                                                         flops_source="JAX part's XLA cost (same layers)")
  timing = interleaved(fns, cfg.repeats)
  for part in stages.PARTS:
    jax_id, torch_id = f"parts.jax.{part}", f"parts.torch.{part}"
    if have_torch:
      res.rows.append(_row(torch_id, f"PyTorch {part}, float32 NCHW", cases[torch_id], timing))
    row = _row(jax_id, f"JAX {part}, float32, BN folded", cases[jax_id], timing)
    if have_torch:
      row.update(ratio=row["samples_per_s"] / res.row(torch_id)["samples_per_s"], ratio_to=torch_id)
    res.rows.append(row)
  res.extra["parts"] = {"composition_max_abs_error": error}


def _agreement_section(res: _Results) -> None:
  """bfloat16 against float32 labels on the same noisy batches (and the same-key counts of rows b)."""
  bench, cfg = res.bench, res.bench.config
  res.log("bfloat16 label agreement")
  counts = res.extra["counts"]
  tv = lambda a, b: 0.5 * float(np.abs(a - b).sum()) / float(a.sum())
  agreement = {"same_key_counts_total_variation": tv(counts["f32_folded"], counts["bf16_folded"])
                                                  if {"f32_folded", "bf16_folded"} <= set(counts) else None}
  rng = np.random.default_rng(cfg.seed + 3)
  images = [np.asarray(bench.inputs.image)] + [rng.uniform(size=cfg.image_shape).astype(np.float32)
                                        for _ in range(cfg.agreement_images - 1)]
  batch = min(cfg.agreement_draws, cfg.batch_size)
  weights = "random weights with calibrated BatchNorm" if cfg.calibrate else "random weights (uncalibrated)"
  agreement["random_resnet"] = {
      "classifier": f"ResNet-{cfg.depth}, {weights}, BN folded", "images": len(images),
      **labels_agreement(bench.nets.classifier("f32_folded"), bench.nets.classifier("bf16_folded"), images,
                         bench.inputs.nz, cfg.agreement_draws, batch, jax.random.key(cfg.seed))}
  agreement["folded_vs_unfolded"] = labels_agreement(bench.nets.classifier("f32"), bench.nets.classifier("f32_folded"),
                                                     images[:1], bench.inputs.nz, cfg.agreement_draws, batch,
                                                     jax.random.key(cfg.seed))
  fixture = fixture_agreement(cfg, bench.inputs.nz, res.log)
  if fixture is not None:
    agreement["trained_resnet20"] = fixture
  primary = agreement.get("trained_resnet20", agreement["random_resnet"])
  res.targets["bfloat16_label_agreement"] = _target(
      "bfloat16_label_agreement", primary["agreement"],
      f"{primary['classifier']}, {primary['samples']} noisy samples; random ResNet-{cfg.depth}: "
      f"{agreement['random_resnet']['agreement']:.4f}")
  res.extra["agreement"] = agreement


def _one_step_section(res: _Results) -> None:
  """Row c: one-step denoiser + classifier, raw against sample_counts; then the NCSN++ preset."""
  bench, cfg = res.bench, res.bench.config
  res.log("c: one-step denoiser + classifier")
  timing = interleaved({n: bench.case(n).run for n in ("c.raw", "c.counts")}, cfg.repeats)
  unet, depth = _unet_name(cfg), f"ResNet-{cfg.depth}"
  res.rows.append(_row("c.raw", f"(c) one-step {unet} + {depth}, forward", bench.case("c.raw"), timing))
  ratio = res.rate("c.counts", timing) / res.rate("c.raw", timing)
  res.rows.append(_row("c.counts", f"(c) one-step {unet} + {depth} in sample_counts", bench.case("c.counts"),
                       timing, ratio=ratio, ratio_to="c.raw"))
  res.targets["sample_counts_vs_forward.one_step"] = _target("sample_counts_vs_forward.one_step", ratio)
  if not cfg.ncsnpp:
    return
  res.log("c: NCSN++ (cifar10_ncsnpp_continuous, random weights) one-step + classifier")
  raw_id, counts_id = "c.ncsnpp_raw", "c.ncsnpp_counts"
  timing = interleaved({n: bench.case(n).run for n in (raw_id, counts_id)}, max(1, cfg.repeats // 2))
  params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(bench.nets.ncsnpp_score_fn().params)))
  raw, counts = bench.case(raw_id), bench.case(counts_id)
  res.rows.append(_row(raw_id, f"(c) one-step NCSN++ ({params / 1e6:.1f}M params) + {depth}, forward", raw, timing))
  res.rows.append(_row(counts_id, f"(c) one-step NCSN++ + {depth} in sample_counts, n={counts.samples}", counts,
                       timing, ratio=res.rate(counts_id, timing) / res.rate(raw_id, timing), ratio_to=raw_id))
  res.extra["ncsnpp"] = {"preset": "cifar10_ncsnpp_continuous", "params": params,
                         "flops_per_image_denoiser_plus_classifier": raw.flops_per_sample,
                         "flops_per_image_classifier": bench.case("d.classifier").flops_per_sample,
                         "samples_per_s_sample_counts": res.rate(counts_id, timing)}


def _unet_name(cfg: BenchmarkConfig) -> str:
  return f"ScoreUNet(ch={cfg.unet_channels}, mults={cfg.unet_mults})"


def _annealed_section(res: _Results) -> None:
  """Row d: annealed denoiser + classifier against L * T score forwards + one classifier forward."""
  bench, cfg = res.bench, res.bench.config
  res.log(f"d: annealed denoiser (L={cfg.levels} x T={cfg.steps_per_level}) + classifier")
  names = ("d.counts", "d.raw", "d.score", "d.classifier")
  timing = interleaved({n: bench.case(n).run for n in names}, max(2, cfg.repeats - 2))
  # Seconds per sample per device, from the medians.
  per_sample = {n: median(timing.seconds[n]) / (bench.case(n).samples / bench.inputs.devices) for n in names}
  evaluations = cfg.levels * cfg.steps_per_level
  expected = evaluations * per_sample["d.score"] + per_sample["d.classifier"]
  unet, depth, anneal = _unet_name(cfg), f"ResNet-{cfg.depth}", f"L={cfg.levels} x T={cfg.steps_per_level}"
  parts = f"{evaluations} x d.score + d.classifier"
  res.rows.append(_row("d.score", f"(d) one score forward ({unet})", bench.case("d.score"), timing))
  res.rows.append(_row("d.classifier", f"(d) one classifier forward ({depth}, folded)", bench.case("d.classifier"),
                       timing))
  res.rows.append(_row("d.raw", f"(d) annealed {anneal} + {depth}, forward", bench.case("d.raw"), timing,
                       ratio=per_sample["d.raw"] / expected, ratio_to=parts))
  ratio = per_sample["d.counts"] / expected
  res.rows.append(_row("d.counts", f"(d) annealed {anneal} + {depth} in sample_counts", bench.case("d.counts"),
                       timing, ratio=ratio, ratio_to=parts))
  res.targets["annealed_vs_expected"] = _target("annealed_vs_expected", ratio, "time ratio, lower is better")


def _train_section(res: _Results) -> None:
  bench, cfg = res.bench, res.bench.config
  res.log("e: score training step")
  timing = interleaved({"e.train": bench.case("e.train").run}, max(2, cfg.repeats - 2))
  res.rows.append(_row("e.train", f"(e) DSM training step, {_unet_name(cfg)}, Adam + EMA", bench.case("e.train"),
                       timing, note="samples = training images"))


def _imagenet_section(res: _Results) -> None:
  bench, cfg = res.bench, res.bench.config
  res.log("imagenet: ResNet-50")
  names = ["imagenet.a.f32", "imagenet.a.f32_folded", "imagenet.b.f32_folded", "imagenet.a.bf16_folded"]
  timing = interleaved({n: bench.case(n).run for n in names}, max(2, cfg.repeats - 2))
  for n in names:
    kind, precision = n.split(".")[1:]
    extra = {}
    if kind == "b":
      forward = f"imagenet.a.{precision}"
      extra = dict(ratio=res.rate(n, timing) / res.rate(forward, timing), ratio_to=forward)
    label = ("forward" if kind == "a" else "in sample_counts") + f", {VARIANT_LABELS[precision]}"
    res.rows.append(_row(n, f"ImageNet ResNet-50 {label}", bench.case(n), timing, **extra))


def _auto_batch_section(res: _Results) -> None:
  """The batch size ``batching`` picks for the folded float32 classifier within the configured budget."""
  bench, cfg = res.bench, res.bench.config
  res.log("auto batch size")
  choice = batching.choose_batch_size(bench.nets.classifier("f32_folded"), cfg.image_shape, cfg.auto_budget_mib * MIB)
  res.extra["auto_batch_size"] = {
      **dataclasses.asdict(choice),
      "estimated_bytes_at_benchmark_batch": choice.fixed_bytes + choice.bytes_per_sample * cfg.batch_size}


def _memory_section(res: _Results) -> None:
  """Peak memory of each configuration in a fresh subprocess, and the n = small vs n = large check."""
  cfg = res.bench.config
  name = "peak_memory_large_n_vs_small_n"
  if not cfg.memory:
    res.targets[name] = _target(name, None, "memory=False")
    return
  probe_ids = [r["id"] for r in res.rows if r["id"].split(".")[0] in ("a", "b", "c", "d", "e", "torch", "imagenet")
               and r["id"] not in ("d.score", "d.classifier")]
  wanted = list(cfg.memory_rows) if cfg.memory_rows is not None else probe_ids + ["mem.small", "mem.large"]
  res.log(f"memory: {len(wanted)} configurations, each in a fresh subprocess ({cfg.memory_workers} at a time)")
  with concurrent.futures.ThreadPoolExecutor(cfg.memory_workers) as pool:
    probed = dict(zip(wanted, pool.map(lambda case_id: probe_memory_in_subprocess(cfg, case_id), wanted)))
  by_id = {r["id"]: r for r in res.rows}
  for case_id, result in probed.items():
    if case_id not in by_id:
      continue
    row = by_id[case_id]
    if "error" in result:
      row["note"] = (row["note"] + "; " if row["note"] else "") + f"memory probe failed: {result['error']}"
    else:
      row.update(peak_memory_growth_bytes=result["growth_bytes"], peak_memory_bytes=result["peak_bytes"],
                 memory_method=result["method"])
  checks = {k: probed[k] for k in ("mem.small", "mem.large") if k in probed}
  res.extra["memory_check"] = checks
  if len(checks) < 2 or any("error" in v for v in checks.values()):
    res.targets[name] = _target(name, None, f"not measured: {checks}")
    return
  small, large = checks["mem.small"], checks["mem.large"]
  for key, result, n in (("mem.small", small, cfg.memory_check_num[0]), ("mem.large", large, cfg.memory_check_num[1])):
    res.rows.append(_row(key, f"sample_counts, small ResNet-8 {cfg.memory_check_shape}, n={n:,}", None, None,
                         batch_size=cfg.memory_check_batch, samples_per_call=n,
                         peak_memory_growth_bytes=result["growth_bytes"], peak_memory_bytes=result["peak_bytes"],
                         memory_method=result["method"]))
  ratio = large["peak_bytes"] / small["peak_bytes"]
  growth = large["growth_bytes"] / max(small["growth_bytes"], 1)
  res.rows[-1].update(ratio=ratio, ratio_to="mem.small")
  res.targets[name] = _target(name, ratio, f"process peak RSS; growth during the call: "
                              f"{large['growth_bytes'] / MIB:.1f} MiB vs {small['growth_bytes'] / MIB:.1f} MiB "
                              f"(ratio {growth:.3f})")


def run_benchmark(config: BenchmarkConfig = BenchmarkConfig(), log: Callable[[str], None] = print) -> dict:
  """Runs every row of ``config`` (module docstring) and returns the results as a JSON-ready dict."""
  started = time.perf_counter()
  env = environment()
  res = _Results(bench=Workbench(config, calibrate=config.calibrate), env=env,
                 log=lambda line: log(f"[{time.perf_counter() - started:6.1f} s] {line}"))
  res.log(f"backend {env['backend']} ({env['device_kind']}) x{env['devices']}, jax {env['jax']}, "
          f"XLA_FLAGS={env['xla_flags']!r}")
  sections = [_classifier_section, _torch_section, _parts_section, _agreement_section, _one_step_section,
              _annealed_section,
              _train_section]
  if config.imagenet:
    sections.append(_imagenet_section)
  loads = []
  for section in sections + [_auto_batch_section, _memory_section]:
    loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    section(res)
  env["load_average_1min"] = loads
  cores = xla_cpu_threads()
  if env["backend"] == "cpu" and max(loads) > cores:
    res.notes.append(f"the machine was shared: 1-minute load average up to {max(loads):.1f} on {cores} cores. "
                     "Absolute rates are contended; ratios come from interleaved runs.")
  if env["backend"] == "cpu":
    cpu = env["cpu"]
    res.notes.append(f"CPU bfloat16 support: avx512_bf16={cpu['avx512_bf16']}, amx_bf16={cpu['amx_bf16']}.")
  return {"environment": env, "config": dataclasses.asdict(config), "rows": res.rows,
          "targets": {k: res.targets.get(k, _target(k, None, "not run")) for k in TARGETS},
          "agreement": res.extra.get("agreement"), "auto_batch_size": res.extra.get("auto_batch_size"),
          "ncsnpp": res.extra.get("ncsnpp"), "parts": res.extra.get("parts"),
          "memory_check": res.extra.get("memory_check", {}),
          "notes": res.notes, "wall_seconds": time.perf_counter() - started}
