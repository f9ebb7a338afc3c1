"""Scripts end on bad input with one line naming the value and the fix, exit status 2, and no traceback."""

import os
import subprocess
import sys

import pytest

from scoresmooth_jax.runtime import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(main, monkeypatch, argv=("script.py",)):
  monkeypatch.setattr(sys, "argv", list(argv))
  cli.run(main)


def test_bad_input_is_one_line_and_exit_status_2(monkeypatch, capsys):
  def main(argv):
    raise ValueError("sigma=-1 must be positive;\n  pass e.g. 0.25.")

  with pytest.raises(SystemExit) as exited:
    _run_main(main, monkeypatch)
  assert exited.value.code == cli.EXIT_BAD_INPUT == 2
  assert capsys.readouterr().err == "script.py: sigma=-1 must be positive; pass e.g. 0.25.\n"


def test_a_missing_file_is_bad_input_too(monkeypatch, capsys, tmp_path):
  def main(argv):
    open(tmp_path / "nowhere.pt")

  with pytest.raises(SystemExit) as exited:
    _run_main(main, monkeypatch)
  assert exited.value.code == 2 and "nowhere.pt" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_the_environment_can_ask_for_it(monkeypatch):
  def bug(argv):
    raise TypeError("a real bug")

  with pytest.raises(TypeError, match="a real bug"):
    _run_main(bug, monkeypatch)

  def bad(argv):
    raise ValueError("bad input")

  monkeypatch.setenv("SCORESMOOTH_TRACEBACK", "1")
  with pytest.raises(ValueError, match="bad input"):
    _run_main(bad, monkeypatch)


@pytest.mark.parametrize("overrides, expected", [
    (["--config.noise.sigma=-0.5"], "sigma=-0.5"),
    (["--config.classifier.path=/no/such/classifier"], "/no/such/classifier"),
])
def test_certify_script_reports_bad_input_in_one_line(tmp_path, overrides, expected):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("SCORESMOOTH_TRACEBACK", None)
  done = subprocess.run([sys.executable, "scripts/certify.py", "--config=configs/certify_digits.py:tiny",
                         f"--workdir={tmp_path}", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("certify.py: ") and expected in last
