"""The scripts' XLA:CPU flags: how they combine with a user's XLA_FLAGS, and that they change speed, not results
(how much speed is the benchmark's business, docs/performance.md)."""

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from scoresmooth_jax.runtime import xla_cpu

FLAG = xla_cpu.RECOMMENDED_CPU_XLA_FLAGS


@pytest.mark.parametrize("user, expected", [
    ("", FLAG),
    ("  ", FLAG),
    ("--xla_force_host_platform_device_count=4", f"--xla_force_host_platform_device_count=4 {FLAG}"),
    # The user's own choice of YNNPACK fusion types stands, whatever it is.
    ("--xla_cpu_experimental_ynn_fusion_type=-eltwise", "--xla_cpu_experimental_ynn_fusion_type=-eltwise"),
    ("--a=1 --xla_cpu_experimental_ynn_fusion_type= --b=2", "--a=1 --xla_cpu_experimental_ynn_fusion_type= --b=2"),
    # A different flag that merely starts with the same text is not the user's choice.
    ("--xla_cpu_experimental_ynn_fusion_type_x=1", f"--xla_cpu_experimental_ynn_fusion_type_x=1 {FLAG}"),
])
def test_with_recommended_cpu_flags(user, expected):
  assert xla_cpu.with_recommended_cpu_flags(user) == expected


def test_apply_recommended_cpu_flags_sets_the_environment():
  environ = {}
  assert xla_cpu.apply_recommended_cpu_flags(environ) == FLAG
  assert environ == {"XLA_FLAGS": FLAG}
  # Applying twice adds nothing: scripts that call each other's main functions stay idempotent.
  assert xla_cpu.apply_recommended_cpu_flags(environ) == FLAG
  # A process whose XLA_FLAGS already chooses the fusion types keeps its choice.
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-eltwise"}
  assert xla_cpu.apply_recommended_cpu_flags(own) == "--xla_cpu_experimental_ynn_fusion_type=-eltwise"
  assert own == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-eltwise"}


SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", ["certify.py", "predict.py", "denoise_images.py", "quickstart.py", "train_score.py",
                                    "train_classifier.py", "convert_torch_classifier.py", "benchmark.py"])
def test_every_computing_script_applies_the_flags_in_main(script):
  tree = ast.parse((SCRIPTS / script).read_text())
  main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
  calls = {node.func.attr for node in ast.walk(main) if isinstance(node, ast.Call)
           and isinstance(node.func, ast.Attribute)}
  assert "apply_recommended_cpu_flags" in calls, f"scripts/{script} runs JAX without the recommended CPU flags"


# Runs in a fresh process, because XLA reads XLA_FLAGS only when it starts: the logits of a BatchNorm-folded ResNet
# on XLA's convolutions (whose bias add, residual add and ReLU the flag fuses), the counts sample_counts draws with
# it, and the DSM loss gradient of a small ScoreUNet (training). XLA aborts on a flag it does not know, so a run
# that finishes also shows that this jaxlib still reads the flag.
_PROGRAM = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
import benchmarks
from scoresmooth_jax import noise, smoothing
from scoresmooth_jax.modelio import classifier
from scoresmooth_jax.models import resnet, score_unet
from scoresmooth_jax.training import losses

images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
net = resnet.CifarResNet(depth=8, shortcut="B", fold_bn=True, conv_impl="xla")
variables = jax.tree.map(jnp.asarray, benchmarks.random_variables(net, images, seed=0))
clf = classifier.Classifier(net, variables, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, image_shape=(16, 16, 3))
counts = smoothing.sample_counts(clf, images[0], noise.Gaussian(0.25), 256, jax.random.key(4), num_classes=10,
                                 batch_size=64)
unet = score_unet.ScoreUNet(channels=16, channel_mults=(1, 2))
sigma = jnp.linspace(0.05, 1.0, 4)
z = jax.random.normal(jax.random.key(2), images.shape)
params = jax.tree.map(jnp.asarray, benchmarks.random_variables(unet, images, sigma, seed=3))  # no init to compile
loss = lambda p: losses.dsm_loss_per_example(unet.apply, p, images, sigma, z).mean()
grads = jax.jit(jax.grad(loss))(params)
np.savez(sys.argv[1], logits=np.asarray(jax.jit(clf)(images)), counts=counts,
         grads=np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
"""


def _run(tmp_path, name, xla_flags):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_COMPILATION"))}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  out = tmp_path / f"{name}.npz"
  subprocess.run([sys.executable, "-c", _PROGRAM, str(out)], env=env, check=True, timeout=600,
                 cwd=SCRIPTS.parent)  # the repository root, where the benchmarks package is
  return np.load(out)


def test_recommended_flags_change_the_speed_not_the_results(tmp_path):
  default = _run(tmp_path, "default", "")
  flagged = _run(tmp_path, "flagged", FLAG)
  # The same function, to float32 rounding of differently ordered sums, and so the same Monte-Carlo counts.
  np.testing.assert_allclose(flagged["logits"], default["logits"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(flagged["counts"], default["counts"])
  assert int(default["counts"].sum()) == 256
  scale = np.max(np.abs(default["grads"]))
  np.testing.assert_allclose(flagged["grads"], default["grads"], rtol=0, atol=1e-4 * scale)
