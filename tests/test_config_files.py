"""configs/ files are plain data: every variant of every file builds without importing JAX (nor Flax, Optax,
Orbax, TensorFlow), and the schema's defaults are the library's."""

import json
import pathlib
import subprocess
import sys

from scoresmooth_jax import denoise
from scoresmooth_jax.runtime import config_schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow", "torch")

# Every config file and every variant it accepts (a new file or variant belongs here).
VARIANTS = {
    "certify_cifar10.py": ["", "tiny"],
    "certify_cifar10_carlini.py": ["", "tiny"],
    "certify_digits.py": ["", "tiny"],
    "certify_imagenet.py": ["", "tiny"],
    "certify_imagenet_carlini.py": ["", "tiny"],
    "classifier_cifar10.py": ["", "tiny", "gaussian_0.25", "finetune_gaussian_0.25"],
    "classifier_digits.py": ["", "tiny", "gaussian_0.25"],
    "score_cifar10.py": ["", "tiny", "cpu_stage1", "cpu_stage2", "cpu_stage3", "cpu_stage4", "cpu_stage5", "accel",
                         "gpu", "gpu_tiny"],
    "score_digits.py": ["", "tiny"],
    "score_imagenet.py": ["", "tiny"],
    "proj/cifar10_cpu/ablations.py": ["first", "wide", "more", "deep", "edm"],
}

_BUILD_ALL = """
import json, sys
from scoresmooth_jax.runtime import configs_util
built = {}
for name, variants in json.loads(sys.argv[1]).items():
  for variant in variants:
    config = configs_util.load_config("configs/" + name, variant)
    built[name + ":" + variant] = config.get("task", config.get("mode"))
print(json.dumps({"built": built, "modules": sorted(sys.modules)}))
"""


def test_every_config_file_is_listed():
  on_disk = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.py")}
  assert on_disk == set(VARIANTS)


def test_building_every_variant_of_every_config_imports_no_jax():
  out = subprocess.run([sys.executable, "-c", _BUILD_ALL, json.dumps(VARIANTS)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout)
  assert len(result["built"]) == sum(map(len, VARIANTS.values()))
  assert set(result["built"].values()) == {"score", "classifier", "certify"}
  heavy = [m for m in result["modules"] if m.split(".")[0] in HEAVY]
  assert not heavy, heavy[:10]


def test_the_certification_schema_defaults_to_the_denoisers_schedule():
  assert config_schema.ANNEALED_DEFAULTS == dict(
      sigma_min=denoise.DEFAULT_SIGMA_MIN, num_levels=denoise.DEFAULT_NUM_LEVELS,
      steps_per_level=denoise.DEFAULT_STEPS_PER_LEVEL, relative_step=denoise.DEFAULT_RELATIVE_STEP)
  denoiser = config_schema.certification_config().denoiser
  assert (denoiser.sigma_min, denoiser.num_levels, denoiser.steps_per_level, denoiser.relative_step) == (
      0.01, 10, 3, 0.5)
