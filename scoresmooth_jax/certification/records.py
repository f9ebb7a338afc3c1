"""Per-image records of a certification or prediction job, written so that an interruption loses nothing.

A job writes two files per process in its workdir:

* ``<mode>[.p<i>-of-<P>].jsonl``: one JSON object per image with everything (counts, p_lower, noise, timings).
  This is the source of truth: each line is flushed and fsync'ed before the image counts as done.
* ``<mode>[.p<i>-of-<P>].tsv``: the same records in Cohen et al.'s format, ``idx label predict radius correct
  time`` for certify and ``idx label predict correct time`` for predict.

On (re)start ``RecordWriter`` drops a half-written last JSON line (the process died mid-write), rebuilds the
TSV from the JSON lines (so a death between the two writes cannot desynchronise them), and reports which
indices are done, so a resumed job neither duplicates nor loses a record. ``job.json`` in the workdir holds the
settings that determine the records; resuming with other settings is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Iterable

JOB_FILE = "job.json"
TSV_COLUMNS = {
    "certify": ("idx", "label", "predict", "radius", "correct", "time"),
    "predict": ("idx", "label", "predict", "correct", "time"),
}


class WorkdirMismatchError(ValueError):
  """The workdir holds records made with different settings."""


def record_stem(mode: str, process_index: int = 0, process_count: int = 1) -> str:
  if mode not in TSV_COLUMNS:
    raise ValueError(f"mode={mode!r} must be one of {sorted(TSV_COLUMNS)}.")
  return mode if process_count == 1 else f"{mode}.p{process_index}-of-{process_count}"


def format_time(seconds: float) -> str:
  """Cohen et al. write elapsed time as ``str(datetime.timedelta)``, e.g. 0:00:01.234567."""
  return str(datetime.timedelta(seconds=round(float(seconds), 6)))


def tsv_line(mode: str, record: dict) -> str:
  values = []
  for column in TSV_COLUMNS[mode]:
    value = record[column]
    if column == "radius":
      value = f"{float(value):.6g}"
    elif column == "time":
      value = format_time(value)
    values.append(str(value))
  return "\t".join(values) + "\n"


def check_job_settings(workdir, settings: dict) -> None:
  """Writes ``job.json`` on first use; afterwards refuses settings that differ from the stored ones."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / JOB_FILE
  settings = json.loads(json.dumps(settings, sort_keys=True))  # normalise tuples, key order
  if path.exists():
    stored = json.loads(path.read_text())
    if stored != settings:
      keys = sorted(set(stored) | set(settings))
      diffs = [f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in keys
               if stored.get(k) != settings.get(k)]
      raise WorkdirMismatchError(
          f"workdir {workdir} holds records made with different settings ({'; '.join(diffs)}). Use a new "
          "--workdir, or run again with the stored settings to resume.")
    return
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
  os.replace(tmp, path)  # atomic: concurrent processes write identical contents


def read_jsonl(path) -> tuple[list[dict], int]:
  """Reads complete JSON lines; returns the records and the byte length of the complete part."""
  path = pathlib.Path(path)
  if not path.exists():
    return [], 0
  data = path.read_bytes()
  records, good = [], 0
  for line in data.splitlines(keepends=True):
    if not line.endswith(b"\n"):
      break  # the last write was cut off
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break
    good += len(line)
  return records, good


class RecordWriter:
  """Appends one image's record to the JSONL and TSV files, durably; see the module docstring."""

  def __init__(self, workdir, mode: str, process_index: int = 0, process_count: int = 1):
    self.mode = mode
    stem = record_stem(mode, process_index, process_count)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = workdir / f"{stem}.jsonl"
    self.tsv_path = workdir / f"{stem}.tsv"
    records, good = read_jsonl(self.jsonl_path)
    if self.jsonl_path.exists() and good < self.jsonl_path.stat().st_size:
      with open(self.jsonl_path, "r+b") as f:
        f.truncate(good)
    self.records = records
    self.done = {int(r["idx"]) for r in records}
    self._rewrite_tsv(records)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._tsv = open(self.tsv_path, "a", encoding="utf-8")

  def _rewrite_tsv(self, records: Iterable[dict]) -> None:
    tmp = self.tsv_path.with_suffix(".tsv.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\t".join(TSV_COLUMNS[self.mode]) + "\n")
      for record in records:
        f.write(tsv_line(self.mode, record))
    os.replace(tmp, self.tsv_path)

  def append(self, record: dict) -> None:
    if int(record["idx"]) in self.done:
      raise ValueError(f"image {record['idx']} already has a record in {self.jsonl_path}.")
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    self._tsv.write(tsv_line(self.mode, record))
    self._tsv.flush()
    self.records.append(record)
    self.done.add(int(record["idx"]))

  def close(self) -> None:
    self._jsonl.close()
    self._tsv.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
