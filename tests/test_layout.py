"""The package layout: the functional API at the top level, everything else in a subpackage by job, and the old
top-level names either still loading (as attributes, with a warning) or failing with the new place named."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

import scoresmooth_jax

PACKAGE = pathlib.Path(scoresmooth_jax.__file__).parent
OLD_NAMES = sorted(scoresmooth_jax.MOVED_MODULES)


def test_the_top_level_holds_only_the_functional_api():
  assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
      "__init__.py", "denoise.py", "noise.py", "sequential.py", "smoothing.py"]


def test_every_moved_module_exists_at_its_new_place_and_not_at_the_old():
  for old, new in scoresmooth_jax.MOVED_MODULES.items():
    assert importlib.import_module(new).__name__ == new
    assert not (PACKAGE / f"{old}.py").exists()


@pytest.mark.parametrize("old", OLD_NAMES)
def test_an_old_name_as_an_attribute_loads_the_moved_module_with_a_warning(old):
  new = scoresmooth_jax.MOVED_MODULES[old]
  with pytest.warns(DeprecationWarning, match=f"scoresmooth_jax.{old} moved to {new}"):
    module = getattr(scoresmooth_jax, old)
  assert module is importlib.import_module(new)


def test_from_import_of_an_old_name_works_and_warns_at_the_caller():
  with pytest.warns(DeprecationWarning, match="scoresmooth_jax.modelio.classifier") as caught:
    from scoresmooth_jax import classifier  # pylint: disable=import-outside-toplevel
  assert classifier.load_classifier is importlib.import_module("scoresmooth_jax.modelio.classifier").load_classifier
  assert caught[0].filename == __file__  # stacklevel points at the import, so the warning is actionable


@pytest.mark.parametrize("old", OLD_NAMES)
def test_an_old_dotted_import_fails_naming_the_new_place(old):
  new = scoresmooth_jax.MOVED_MODULES[old]
  with pytest.raises(ModuleNotFoundError, match=f"scoresmooth_jax.{old}'.*moved to {new}") as raised:
    importlib.import_module(f"scoresmooth_jax.{old}")
  assert raised.value.name == f"scoresmooth_jax.{old}"


def test_an_old_from_dotted_import_fails_naming_the_new_place():
  # `data` is also the folder of package data: without the hook it would import as an empty namespace package.
  with pytest.raises(ModuleNotFoundError, match="scoresmooth_jax.datasets.data"):
    from scoresmooth_jax.data import get_source  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def test_other_missing_names_stay_plain_errors():
  with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
    scoresmooth_jax.no_such_module  # pylint: disable=pointless-statement
  with pytest.raises(ModuleNotFoundError, match="No module named 'scoresmooth_jax.no_such_module'$"):
    importlib.import_module("scoresmooth_jax.no_such_module")


def test_importing_the_package_loads_no_job_subpackage():
  # `import scoresmooth_jax` is what other JAX code pays for noise / denoise / smoothing; only the mesh comes along.
  code = "import json, sys, scoresmooth_jax; print(json.dumps(sorted(sys.modules)))"
  loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     timeout=120, cwd=PACKAGE.parent).stdout)
  assert "scoresmooth_jax.runtime.sharding" in loaded
  for package in ("bench", "certification", "datasets", "modelio", "models", "training"):
    assert not [m for m in loaded if m.startswith(f"scoresmooth_jax.{package}")], package


def test_the_wheel_finds_every_subpackage_and_the_package_data_is_in_place():
  # pyproject.toml: [tool.setuptools.packages.find] include = ["scoresmooth_jax*"].
  setuptools = pytest.importorskip("setuptools", reason="setuptools (the build backend) is not installed")
  found = set(setuptools.find_packages(str(PACKAGE.parent), include=["scoresmooth_jax*"]))
  on_disk = {"scoresmooth_jax." + p.parent.relative_to(PACKAGE).as_posix().replace("/", ".")
             for p in PACKAGE.glob("*/__init__.py")}
  assert on_disk <= found and {"scoresmooth_jax.training", "scoresmooth_jax.modelio"} <= on_disk
  assert (PACKAGE / "data" / "digits.npz").is_file() and (PACKAGE / "shipped" / "cifar10-cpu.json").is_file()
