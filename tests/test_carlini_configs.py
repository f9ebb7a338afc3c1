"""Carlini et al.'s two pipelines (configs/certify_*_carlini.py) certify end to end with the small fixtures.

The tiny variants run the whole job: tfds mock images, the OpenAI UNet fixtures as one-step denoisers, and the
ViT / BEiT fixtures converted to exports as classifiers (the ImageNet variant resizes the 64 x 64 draws to the
32 x 32 BEiT without clipping, as the full config resizes 256 to 512).
"""

import json

import pytest
import tensorflow_datasets as tfds

from scoresmooth_jax.certification import certify_job, report
from scoresmooth_jax.modelio import convert_vit
from scoresmooth_jax.modelio import openai_diffusion as od
from scoresmooth_jax.runtime.configs_util import load_config

# config -> (OpenAI fixture, its diffusion, its image shape, the classifier fixture: format, path, --arch)
PIPELINES = {
    "configs/certify_cifar10_carlini.py": (
        "openai_iddpm_small", od.Diffusion("cosine", 4000, rescale_timesteps=True), (32, 32, 3),
        ("hf", "hf_vit_small", None)),
    "configs/certify_imagenet_carlini.py": (
        "openai_adm_small", od.Diffusion("linear", 1000, rescale_timesteps=False), (64, 64, 3),
        ("timm", "timm_beit_small.pth", "timm_beit_small_config.json")),
}


@pytest.mark.slow
@pytest.mark.parametrize("config_file", sorted(PIPELINES))
def test_tiny_variant_certifies_two_images(fixtures_dir, tmp_path, monkeypatch, config_file):
  unet, diffusion, shape, (fmt, checkpoint, arch) = PIPELINES[config_file]
  pytest.importorskip("torch", reason="the OpenAI UNet fixtures are PyTorch state dicts")
  unet_kwargs = json.loads((fixtures_dir / f"{unet}_config.json").read_text())["constructor"]
  monkeypatch.setitem(od.PRESETS, unet, od.preset_from_unet_kwargs(unet_kwargs, diffusion, shape, name=unet))
  clf_path = convert_vit.convert_transformer(fixtures_dir / checkpoint, fmt, arch=arch and fixtures_dir / arch).export(
      tmp_path / "classifier")
  config = load_config(config_file, "tiny", classifier__path=str(clf_path),
                       denoiser__score=f"openai:{unet}:{fixtures_dir / (unet + '.pt')}")
  assert config.denoiser.kind == "one_step" and config.classifier.input == "resize"
  assert config.classifier.resize_method == "bicubic_antialias" and not config.classifier.resize_clip
  # Carlini et al. do not clip after resizing; the workdir records it.
  assert certify_job.JobSpec.from_config(config).settings()["resize_clip"] is False
  with tfds.testing.mock_data(num_examples=3):
    recs = certify_job.run_certification(config, tmp_path / "w")
  assert [r["idx"] for r in recs] == [0, 1] and report.check(recs) == []
  assert all(r["denoiser"] == "one_step" and r["n"] == 16 and sum(r["n0_counts"]) == 8 for r in recs)
