"""Records survive interruption at any byte; reports compute Cohen's certified accuracy and flag bad records."""

import json

import numpy as np
import pytest

from scoresmooth_jax.certification import records, report


def rec(idx, label, predict, radius, **extra):
  return dict(idx=idx, label=label, predict=predict, radius=radius, correct=int(predict == label), time=0.5,
              norm="l2", **extra)


def test_writer_appends_durably_and_resumes(tmp_path):
  with records.RecordWriter(tmp_path, "certify") as w:
    w.append(rec(0, 3, 3, 0.25))
    w.append(rec(2, 1, -1, 0.0))
  tsv = (tmp_path / "certify.tsv").read_text().splitlines()
  assert tsv[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
  assert tsv[1] == "0\t3\t3\t0.25\t1\t0:00:00.500000"
  assert tsv[2].split("\t")[:5] == ["2", "1", "-1", "0", "0"]
  with records.RecordWriter(tmp_path, "certify") as w:
    assert w.done == {0, 2}
    with pytest.raises(ValueError, match="already has a record"):
      w.append(rec(0, 3, 3, 0.25))


def test_cut_off_json_line_and_missing_tsv_line_are_repaired(tmp_path):
  with records.RecordWriter(tmp_path, "certify") as w:
    w.append(rec(0, 3, 3, 0.25))
    w.append(rec(1, 3, 3, 0.5))
  jsonl = tmp_path / "certify.jsonl"
  # Death mid-write of image 2's JSON line, and image 1's TSV line never written.
  with open(jsonl, "a") as f:
    f.write('{"idx": 2, "lab')
  lines = (tmp_path / "certify.tsv").read_text().splitlines()
  (tmp_path / "certify.tsv").write_text("\n".join(lines[:2]) + "\n")
  with records.RecordWriter(tmp_path, "certify") as w:
    assert w.done == {0, 1}
    w.append(rec(2, 0, 0, 1.0))
  assert [json.loads(l)["idx"] for l in jsonl.read_text().splitlines()] == [0, 1, 2]
  assert [l.split("\t")[0] for l in (tmp_path / "certify.tsv").read_text().splitlines()] == ["idx", "0", "1", "2"]


def test_job_settings_mismatch_names_the_difference(tmp_path):
  records.check_job_settings(tmp_path, {"sigma": 0.25, "n": 100})
  records.check_job_settings(tmp_path, {"n": 100, "sigma": 0.25})  # same settings, any order
  with pytest.raises(records.WorkdirMismatchError, match=r"sigma: stored 0.25, now 0.5"):
    records.check_job_settings(tmp_path, {"sigma": 0.5, "n": 100})


def test_certified_accuracy_follows_cohen():
  recs = [rec(0, 1, 1, 0.6), rec(1, 1, 1, 0.2), rec(2, 1, 0, 0.9), rec(3, 1, -1, 0.0)]
  np.testing.assert_allclose(report.certified_accuracy(recs, [0.0, 0.2, 0.5, 0.7]), [0.5, 0.5, 0.25, 0.0])


def test_check_flags_inconsistent_records():
  good = [rec(0, 1, 1, 0.6), rec(1, 2, -1, 0.0)]
  assert report.check(good) == []
  bad = good + [rec(0, 1, 1, 0.3), dict(rec(5, 1, -1, 0.4)), dict(rec(6, 1, 1, 0.1), correct=2),
                dict(rec(7, 1, 2, 0.1), correct=1)]
  problems = "\n".join(report.check(bad))
  assert "duplicate indices [0]" in problems
  assert "idx 5: radius=0.4 > 0 on ABSTAIN" in problems
  assert "idx 6: correct=2 is not 0/1" in problems
  assert "idx 7: correct=1 but predict=2" in problems


def test_reads_cohen_tsv_and_our_workdir_alike(tmp_path):
  cohen = tmp_path / "cohen.tsv"
  cohen.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.512\t1\t0:00:01.2\n"
                   "20\t8\t-1\t0.0\t0\t0:00:01.1\n")
  loaded = report.load_records(cohen)
  assert loaded[0] == dict(idx=0, label=3, predict=3, radius=0.512, correct=1)
  with records.RecordWriter(tmp_path / "w", "certify", 0, 2) as w:
    w.append(rec(0, 3, 3, 0.5))
  with records.RecordWriter(tmp_path / "w", "certify", 1, 2) as w:
    w.append(rec(1, 3, 3, 0.5))
  merged = report.load_records(tmp_path / "w")
  assert sorted(r["idx"] for r in merged) == [0, 1]
  markdown, csv_text = report.table({"cohen": loaded, "ours": merged}, [0.0, 0.5])
  assert "| cohen | ? | 2 | 50.0 | 50.0 |" in markdown
  assert "ours,l2,2,100.0,100.0" in csv_text
  with pytest.raises(ValueError, match="missing columns"):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    report.load_records(bad)


def test_plot_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib", reason="plots need the 'plot' extra")
  out = report.plot({"a": [rec(0, 1, 1, 0.5)], "b": [rec(0, 1, 1, 0.2)]}, tmp_path / "c.png")
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
