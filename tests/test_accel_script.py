"""scripts/accel_cifar10.sh: the budgeted accelerator run (inputs checked, step count taken from the probe's rate).

The real scripts it calls are tested elsewhere (tests/test_train.py trains :accel on a small folder); here a
stand-in interpreter records each call and writes the probe's metrics, so the shell logic runs in a second.
"""

import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Records its arguments; the probe's train_score call logs two rates (the first includes compilation); the real
# run's training succeeds; shipping fails with 3, so the test never touches the package's shipped files.
STAND_IN = """#!/usr/bin/env bash
if [[ $1 == - ]]; then exec "{python}" "$@"; fi
echo "$*" >> "{calls}"
if [[ $1 == scripts/train_score.py ]]; then
  while (($#)); do [[ $1 == --workdir ]] && workdir=$2; shift; done
  mkdir -p "$workdir"
  printf '{{"step": 100, "steps_per_sec": 4.0}}\\n{{"step": 300, "steps_per_sec": 12.5}}\\n' > "$workdir/metrics.jsonl"
  exit 0
fi
exit 3
"""


def _inputs(tmp_path):
  image = tmp_path / "x.jpg"
  image.write_bytes(b"not decoded by the stand-in")
  with tarfile.open(tmp_path / "train.tar.gz", "w:gz") as tar:
    tar.add(image, "train/airplane/0000.jpg")
  fixtures = tmp_path / "fixtures"
  fixtures.mkdir()
  for name in ("cifar10_test_first1017.npz", "resnet20-12fca82f.th"):
    (fixtures / name).write_bytes(b"")
  python = tmp_path / "python"
  python.write_text(STAND_IN.format(python=sys.executable, calls=tmp_path / "calls"))
  python.chmod(0o755)
  return dict(DATA_TAR=str(tmp_path / "train.tar.gz"), FIXTURES=str(fixtures), PYTHON=str(python),
              WORK=str(tmp_path / "work"), PATH="/usr/bin:/bin")


def _run(tmp_path, **env):
  return subprocess.run(["bash", "scripts/accel_cifar10.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)


def test_the_step_count_fills_the_budget_at_the_probes_rate(tmp_path):
  env = _inputs(tmp_path)
  result = _run(tmp_path, **env, TRAIN_SECONDS="1000")
  assert result.returncode == 3, result.stdout + result.stderr  # stopped by the stand-in's shipping
  probe, run, ship = (tmp_path / "calls").read_text().splitlines()
  work = env["WORK"]
  assert "--config configs/score_cifar10.py:accel" in probe and f"--workdir {work}/probe" in probe
  assert "--config.train.num_steps=300" in probe and "--config.optim.warmup_steps=100" in probe
  assert f"--config.data.name=folder:{work}/data" in run and f"--workdir {work}/run" in run
  # 12.5 steps/s (the compile-free rate) x 1000 s x 0.9, in whole dispatches of 10 steps
  assert "--config.train.num_steps=11250" in run and "--config.train.eval_every=1000" in run
  assert ship.startswith("scripts/ship_score_model.py") and "--config.train.num_steps=11250" in ship
  assert (pathlib.Path(work) / "data" / "train" / "airplane" / "0000.jpg").exists()
  assert (tmp_path / "out" / "metrics.jsonl").exists() and (tmp_path / "out" / "run.log").exists()


def test_a_budget_too_short_for_min_steps_stops_before_training(tmp_path):
  result = _run(tmp_path, **_inputs(tmp_path), TRAIN_SECONDS="50")
  assert result.returncode != 0
  assert "12.50 steps/s leaves 560 steps in 50 s (MIN_STEPS=1000); raise TRAIN_SECONDS" in result.stdout
  assert len((tmp_path / "calls").read_text().splitlines()) == 1  # the probe only


@pytest.mark.parametrize("missing", ["DATA_TAR", "FIXTURES"])
def test_missing_inputs_are_named(tmp_path, missing):
  env = {**_inputs(tmp_path), missing: str(tmp_path / "nowhere")}
  result = _run(tmp_path, **env)
  assert result.returncode == 2 and str(tmp_path / "nowhere") in result.stderr
  assert "set DATA_TAR / FIXTURES" in result.stderr
