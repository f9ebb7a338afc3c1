"""The scripts' XLA:CPU flags: how they combine with a user's XLA_FLAGS, and that they change speed, not results."""

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


SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", ["certify.py", "predict.py", "denoise_images.py", "quickstart.py", "train_score.py",
                                    "train_classifier.py", "convert_torch_classifier.py", "benchmark.py"])
def test_every_computing_script_applies_the_flags_in_main(script):
  tree = ast.parse((SCRIPTS / script).read_text())
  main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
  calls = {node.func.attr for node in ast.walk(main) if isinstance(node, ast.Call)
           and isinstance(node.func, ast.Attribute)}
  assert "apply_recommended_cpu_flags" in calls, f"scripts/{script} runs JAX without the recommended CPU flags"


# Runs in a fresh process, because XLA reads XLA_FLAGS only when it starts: the folded ResNet-20's logits, the DSM
# loss gradient of a small ScoreUNet, how many convolutions the compiled ResNet gives to YNNPACK fusions, and how
# many of those fusions read a constant that XLA materialised at an activation's full size.
_PROGRAM = r"""
import re, sys
import jax, jax.numpy as jnp, numpy as np
from scoresmooth_jax import bench
from scoresmooth_jax.training import losses
from scoresmooth_jax.models import resnet, score_unet


def materialised_constant_reads(hlo):
  # Operands of YNNPACK fusions that are a scalar or 2-D constant (a ReLU's zero, the column-pairs mask) broadcast
  # to a whole [B, H, W, C] activation outside the fusion: memory traffic instead of a fused broadcast.
  constants = dict(re.findall(r"(%constant[.\d]*) = f32\[([\d,]*)\]", hlo))
  materialised = {name for name, const in re.findall(
      r"(%[\w.-]+) = f32\[\d+,\d+,\d+,\d+\]\{[^}]*\} fusion\((%constant[.\d]*)\), kind=kLoop", hlo)
      if constants.get(const, "").count(",") != 0 or constants.get(const) == ""}
  reads = 0
  for operands in re.findall(r"fusion\(([^)]*)\), kind=kCustom.*__ynn_fusion", hlo):
    reads += sum(operand.strip() in materialised for operand in operands.split(","))
  return reads

images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
net = resnet.CifarResNet(depth=20, fold_bn=True)
variables = jax.jit(net.init)(jax.random.key(1), images)
forward = jax.jit(net.apply).lower(variables, images).compile()
unet = score_unet.ScoreUNet(channels=16, channel_mults=(1, 2))
sigma = jnp.linspace(0.05, 1.0, 4)
z = jax.random.normal(jax.random.key(2), images.shape)
params = jax.jit(unet.init)(jax.random.key(3), images, sigma)
loss = lambda p: losses.dsm_loss_per_example(unet.apply, p, images, sigma, z).mean()
grads = jax.jit(jax.grad(loss))(params)
paired = resnet.CifarResNet(depth=20, shortcut="B", fold_bn=True, column_pairs=True)
paired_variables = jax.tree.map(jnp.asarray, bench.random_variables(paired, images, seed=0))  # distinct biases
paired_hlo = jax.jit(paired.apply).lower(paired_variables, images).compile().as_text()
np.savez(sys.argv[1], logits=np.asarray(forward(variables, images)),
         grads=np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]),
         ynn_fusions=forward.as_text().count("__ynn_fusion"),
         constant_reads=materialised_constant_reads(paired_hlo))
"""


def _run(tmp_path, name, xla_flags):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_COMPILATION"))}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  out = tmp_path / f"{name}.npz"
  subprocess.run([sys.executable, "-c", _PROGRAM, str(out)], env=env, check=True, timeout=600)
  return np.load(out)


def test_recommended_flags_change_the_kernels_not_the_results(tmp_path):
  default = _run(tmp_path, "default", "")
  flagged = _run(tmp_path, "flagged", FLAG)
  # The flag took effect: more of the compiled network runs as YNNPACK fusions.
  assert int(flagged["ynn_fusions"]) > int(default["ynn_fusions"])
  # The folded network's ReLUs take their thresholds from their own biases and inputs (resnet.relu_of_sum), so no
  # fused convolution reads a shared zero or mask from memory (with nn.relu and the mask product: 8 reads).
  assert int(flagged["constant_reads"]) == 0
  # ... and computes the same function, to float32 rounding of differently ordered sums.
  np.testing.assert_allclose(flagged["logits"], default["logits"], rtol=1e-4, atol=1e-5)
  scale = np.max(np.abs(default["grads"]))
  np.testing.assert_allclose(flagged["grads"], default["grads"], rtol=0, atol=1e-4 * scale)
