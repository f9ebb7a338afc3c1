"""Any score model by the name a user gives it: ``load_score(spec, compute_dtype)``.

A spec is a score export directory (``<workdir>/export``), a shipped model's name (``cifar10-cpu``) or file
(``.../<name>.npz``), ``score_sde:<preset>:<checkpoint>`` (Song et al.'s published checkpoints) or
``openai:<preset>:<path.pt>`` (improved- and guided-diffusion). Each kind's reader recognises its own specs
(``pretrained.is_score_sde_spec``, ``openai_diffusion.is_openai_spec``); this module only dispatches.
"""

from __future__ import annotations

from scoresmooth_jax.modelio import export, openai_diffusion, pretrained


def load_score(spec: str, compute_dtype: str = "float32"):
  """The score function of ``spec`` (module docstring), its network computing in ``compute_dtype``
  (float32 | bfloat16; parameters stay float32)."""
  if pretrained.is_score_sde_spec(spec):
    return pretrained.load_score_sde_from_spec(spec, compute_dtype=compute_dtype)[0]
  if openai_diffusion.is_openai_spec(spec):
    return openai_diffusion.load_openai_from_spec(spec, compute_dtype=compute_dtype)[0]
  return export.load_score_fn(spec, compute_dtype=compute_dtype)
