"""The analytic VAE start (demo/vae_init.py): exact colours through SD's GroupNorm-ended topology."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from demo.vae_init import init_block_average_vae
from engine.vae import AutoencoderKL, VAEConfig
from tests.helpers import analytic_vae


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return analytic_vae()


def _images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # Random 8x8-block colour fields plus one flat image: what the start must reproduce exactly.
    blocks = torch.rand(3, 3, 4, 4, generator=gen)
    flat = torch.ones(1, 3, 4, 4) * torch.tensor([0.05, 0.5, 0.95]).view(1, 3, 1, 1)
    return F.interpolate(torch.cat([blocks, flat]), scale_factor=8, mode="nearest")


@torch.no_grad()
def test_encoder_mean_is_the_8x8_block_colour(vae: AutoencoderKL) -> None:
    x = _images()
    mean, logvar = vae.encode(x * 2 - 1)
    expected = F.avg_pool2d(x * 2 - 1, 8)
    assert torch.allclose(mean[:, :3], expected, atol=5e-3)  # 5e-3 in [-1, 1] is under one level of 255
    assert mean[:, 3].abs().max() < 0.1  # the free channel starts small (tiny random weights over 128 channels)
    assert torch.all(logvar < -7)


@torch.no_grad()
def test_block_images_and_flat_colours_come_back_exactly(vae: AutoencoderKL) -> None:
    x = _images()
    mean, _ = vae.encode(x * 2 - 1)
    recon = (vae.decode(mean) + 1) / 2
    assert (recon - x).abs().max() * 255 < 2.0


def test_refuses_configs_it_cannot_start() -> None:
    with pytest.raises(ValueError, match="ch=128"):
        init_block_average_vae(AutoencoderKL(VAEConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1)))
