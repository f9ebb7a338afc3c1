"""The package layout: the functional API at the top level, everything else in a subpackage by job, and no
import loops (also none hidden in function-local imports)."""

import ast
import json
import pathlib
import subprocess
import sys
import tomllib

import pytest

import scoresmooth_jax

PACKAGE = pathlib.Path(scoresmooth_jax.__file__).parent
MAX_LINES = 450


def test_the_top_level_holds_only_the_functional_api():
  assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
      "__init__.py", "certificate.py", "denoise.py", "noise.py", "resize.py", "sequential.py", "smoothing.py"]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package's modules that ``path`` imports anywhere in its body (top level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from a.b import c` imports the module a.b.c when there is one, else takes the name c from a.b
      subs = [f"{node.module}.{alias.name}" for alias in node.names]
      names = [name for name in subs if name in modules] or [node.module]
    else:
      continue
    found |= {name for name in names if name in modules}
  return found


def _import_graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  modules = set(files)
  # A package's __init__ importing its own submodules is how packages work, not a loop between modules.
  return {name: {m for m in _imports(path, modules) if not name or not m.startswith(name + ".")}
          for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack + [nxt])
        if found:
          return found
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_no_module_of_the_package_imports_itself_back():
  cycle = _cycle(_import_graph())
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_loop_through_a_function_local_import():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_longer_than_the_house_limit():
  long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


REPO = PACKAGE.parent
MAX_DOC_LINES = 150


def test_every_docs_page_is_short():
  long = {p.name: n for p in (REPO / "docs").glob("*.md") if (n := len(p.read_text().splitlines())) > MAX_DOC_LINES}
  assert not long, f"docs pages over {MAX_DOC_LINES} lines: {long}"


def test_nothing_users_read_points_at_a_folder_beside_the_checkout():
  # Users pass their own paths; a default of "../shared" exists only beside one checkout.
  files = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
  for folder in ("scoresmooth_jax", "configs", "scripts", "benchmarks"):
    files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh", ".md", ".json")]
  offenders = [str(p.relative_to(REPO)) for p in files if "../shared" in p.read_text(errors="replace")]
  assert not offenders, f"these name ../shared: {offenders}"


def _loaded_by(code: str) -> list[str]:
  code += "; import json, sys; print(json.dumps(sorted(sys.modules)))"
  return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   timeout=120, cwd=PACKAGE.parent).stdout)


def test_importing_the_package_loads_no_job_subpackage():
  # The functional API is what other JAX code pays for noise / denoise / smoothing; only the mesh comes along.
  loaded = _loaded_by("from scoresmooth_jax import denoise, noise, smoothing")
  assert "scoresmooth_jax.runtime.sharding" in loaded
  for package in ("certification", "datasets", "modelio", "models", "training"):
    assert not [m for m in loaded if m.startswith(f"scoresmooth_jax.{package}")], package


def test_the_package_itself_imports_nothing_until_its_api_is_used():
  # configs/ files import runtime.config_schema through the package: that must not load JAX.
  assert not [m for m in _loaded_by("import scoresmooth_jax") if m.startswith(("jax", "scoresmooth_jax."))]
  loaded = _loaded_by("import scoresmooth_jax; scoresmooth_jax.smoothing.certify")
  assert "scoresmooth_jax.smoothing" in loaded and "jax" in loaded


def test_the_wheel_finds_every_subpackage_and_the_package_data_is_in_place():
  setuptools = pytest.importorskip("setuptools", reason="setuptools (the build backend) is not installed")
  pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
  found = set(setuptools.find_packages(str(PACKAGE.parent), **pyproject["tool"]["setuptools"]["packages"]["find"]))
  on_disk = {"scoresmooth_jax." + p.parent.relative_to(PACKAGE).as_posix().replace("/", ".")
             for p in PACKAGE.glob("*/__init__.py")}
  assert on_disk <= found and {"scoresmooth_jax.training", "scoresmooth_jax.modelio"} <= on_disk
  # The benchmarks sit beside the package, and the wheel leaves them out.
  assert (PACKAGE.parent / "benchmarks" / "__init__.py").is_file() and not (PACKAGE / "bench").exists()
  assert not [p for p in found if not p.startswith("scoresmooth_jax.") and p != "scoresmooth_jax"], found
  assert (PACKAGE / "data" / "digits.npz").is_file() and (PACKAGE / "shipped" / "cifar10-cpu.json").is_file()
