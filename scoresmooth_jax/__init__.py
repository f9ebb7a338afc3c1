"""scoresmooth_jax: certified robustness for any pretrained classifier by randomized smoothing over a
score-based denoiser (JAX/Flax). See README.md; the public surface is ``noise``, ``denoise``, ``smoothing``.

Everything else lives in a subpackage by job: ``training``, ``certification``, ``modelio``, ``datasets``,
``runtime``, ``models``, ``bench``. The modules that used to sit at the top level still load by their old name
as an attribute (``from scoresmooth_jax import certify_job``), with a DeprecationWarning naming the new place.
The old dotted names (``import scoresmooth_jax.certify_job``, ``from scoresmooth_jax.export import ...``) fail
with a ModuleNotFoundError that names the new place, rather than loading one module under two names (whose
``__spec__`` could name only one of them).
"""

import importlib
import importlib.abc
import sys
import warnings

from scoresmooth_jax import denoise, noise, smoothing

__all__ = ["denoise", "noise", "smoothing"]
__version__ = "0.1.0"

# Old top-level module -> where it lives now.
MOVED_MODULES = {
    **{name: f"scoresmooth_jax.training.{name}" for name in ("train", "train_state", "losses", "evaluate")},
    **{name: f"scoresmooth_jax.certification.{name}" for name in ("certify_job", "records", "report", "figures")},
    **{name: f"scoresmooth_jax.modelio.{name}"
       for name in ("checkpoint", "convert", "export", "pretrained", "openai_diffusion", "classifier")},
    **{name: f"scoresmooth_jax.datasets.{name}" for name in ("data", "image_folder")},
    **{name: f"scoresmooth_jax.runtime.{name}" for name in ("sharding", "batching", "xla_cpu", "configs_util")},
    "torch_baseline": "scoresmooth_jax.bench.torch_baseline",
}


def __getattr__(name):
  new = MOVED_MODULES.get(name)
  if new is None:
    raise AttributeError(f"module 'scoresmooth_jax' has no attribute {name!r}")
  package, _, module = new.rpartition(".")
  warnings.warn(f"scoresmooth_jax.{name} moved to {new}; write `from {package} import {module}`.",
                DeprecationWarning, stacklevel=2)
  return importlib.import_module(new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
  """Answers an import of an old dotted name with the new place. Without it ``import scoresmooth_jax.data``
  would quietly import the ``data/`` folder of package data as an empty namespace package."""

  def find_spec(self, fullname, path=None, target=None):
    package, _, name = fullname.rpartition(".")
    if package != __name__ or name not in MOVED_MODULES:
      return None
    new = MOVED_MODULES[name]
    new_package, _, module = new.rpartition(".")
    raise ModuleNotFoundError(f"No module named {fullname!r}: it moved to {new}; write "
                              f"`from {new_package} import {module}` or `import {new}`.", name=fullname)


# Registered once, even if the package is reloaded (a reload makes a new class, hence the name).
if not any(type(finder).__name__ == "_MovedModuleFinder" for finder in sys.meta_path):
  sys.meta_path.insert(0, _MovedModuleFinder())
