"""Parity of engine.vae.AutoencoderKL with diffusers' AutoencoderKL on tiny random configs.

The independent check of our LDM layout is diffusers' own offline converter
`convert_ldm_vae_checkpoint`, fed our state dict under the real checkpoint prefix
`first_stage_model.`; if our names or module structure were wrong, strict loading into
diffusers' model (or the numbers) would fail.
"""

from __future__ import annotations

import pytest
import torch

from engine.vae import (
    AutoencoderKL,
    VAEConfig,
    load_vae_from_state_dict,
    normalize_vae_state_dict,
    vae_config_from_state_dict,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TOL = 1e-4

# Two layouts: the minimal one, and one with several downsamplings, nin_shortcuts at a width change
# that is not the first level, and more than one res block per level (3 per decoder level).
CONFIGS = {
    "small": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "deeper": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2),
}


def _random_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Our model with every parameter random, including GroupNorm affine terms (whose default
    init 1/0 would hide a swapped weight/bias or a missing norm)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name:  # norm1, norm2, norm, norm_out
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def _diffusers_config(config: VAEConfig, sample_size: int) -> dict:
    levels = len(config.ch_mult)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        # diffusers has a single latent width: LDM's z_channels == embed_dim for every SD VAE.
        "latent_channels": config.z_channels,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
    }


def _diffusers_twin(model: AutoencoderKL, sample_size: int):
    """Convert our weights with diffusers' converter (from the full-checkpoint key names) and
    load them strictly into diffusers' AutoencoderKL."""
    checkpoint = {f"first_stage_model.{k}": v.clone() for k, v in model.state_dict().items()}
    # A real checkpoint also holds the UNet and text encoder; the converter must pick the VAE out.
    checkpoint["model.diffusion_model.out.0.weight"] = torch.zeros(4)
    dconfig = _diffusers_config(model.config, sample_size)
    converted = convert_ldm_vae_checkpoint(checkpoint, dconfig)
    ref = diffusers.AutoencoderKL(**dconfig)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    ours = _random_vae(config)
    ref = _diffusers_twin(ours, sample_size=32)
    return config, ours, ref


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    config, ours, ref = pair
    f = config.downscale_factor
    # Non-square so that a height/width transposition anywhere cannot pass.
    pixels = torch.rand(2, 3, 6 * f, 4 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.encode(pixels)
    dist = ref.encode(pixels).latent_dist
    assert mean.shape == (2, config.embed_dim, 6, 4)
    d_mean, d_logvar = _maxdiff(mean, dist.mean), _maxdiff(logvar, dist.logvar)
    print(f"\nencode max|diff| mean={d_mean:.3e} logvar={d_logvar:.3e}")
    assert d_mean < TOL and d_logvar < TOL
    # The scaled, deterministic path: mean * scaling_factor from [0, 1] images.
    latents = ours.encode_latents((pixels + 1) / 2)
    assert _maxdiff(latents, dist.mean * config.scaling_factor) < TOL
    # A posterior sample with one generator matches diffusers' sampling with the same seed.
    sample = ours.encode_latents((pixels + 1) / 2, generator=torch.Generator().manual_seed(7))
    ref_sample = dist.sample(generator=torch.Generator().manual_seed(7)) * config.scaling_factor
    assert _maxdiff(sample, ref_sample) < TOL


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    config, ours, ref = pair
    z = torch.randn(2, config.embed_dim, 5, 3, generator=torch.Generator().manual_seed(2))
    out = ours.decode(z)
    expected = ref.decode(z).sample
    f = config.downscale_factor
    assert out.shape == (2, config.out_channels, 5 * f, 3 * f)
    d = _maxdiff(out, expected)
    print(f"\ndecode max|diff|={d:.3e} (output scale {expected.abs().max().item():.2f})")
    assert d < TOL
    images = ours.decode_latents(z * config.scaling_factor)
    assert _maxdiff(images, ((expected + 1) / 2).clamp(0, 1)) < TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_inferred_from_state_dict(name):
    config = CONFIGS[name]
    sd = AutoencoderKL(config).state_dict()
    assert vae_config_from_state_dict(sd) == config
    assert vae_config_from_state_dict(sd, scaling_factor=0.13025) == VAEConfig(
        **{**config.__dict__, "scaling_factor": 0.13025}
    )


def test_config_inference_distinguishes_embed_dim_and_channels():
    # Layouts diffusers cannot express (embed_dim != z_channels, 1-channel in / 2-channel out)
    # still round-trip through the inference.
    config = VAEConfig(in_channels=1, out_channels=2, ch=32, ch_mult=(2, 1), num_res_blocks=1, z_channels=6, embed_dim=3)
    model = AutoencoderKL(config)
    assert vae_config_from_state_dict(model.state_dict()) == config
    with torch.no_grad():
        out = model.decode_latents(model.encode_latents(torch.rand(1, 1, 8, 6)))
    assert out.shape == (1, 2, 8, 6)


def test_linear_attention_weights_load_after_normalisation():
    config = CONFIGS["small"]
    ours = _random_vae(config, seed=3)
    sd = dict(ours.state_dict())
    flattened = 0
    for key in list(sd):
        if ".mid.attn_1." in key and key.endswith(".weight") and sd[key].ndim == 4:
            sd[key] = sd[key][:, :, 0, 0].clone()  # the 2-D linear form some files use
            flattened += 1
    assert flattened == 8  # q, k, v, proj_out in encoder and decoder
    # Training leftovers that real VAE files carry must be dropped, not rejected.
    sd["loss.discriminator.main.0.weight"] = torch.zeros(3)
    sd["model_ema.decay"] = torch.tensor(0.999)

    with pytest.raises(RuntimeError):
        AutoencoderKL(config).load_state_dict(sd)  # unnormalised: shapes / extra keys refuse

    clean = normalize_vae_state_dict(sd)
    assert not any(k.startswith(("loss.", "model_ema.")) for k in clean)
    fresh = AutoencoderKL(config)
    fresh.load_state_dict(clean, strict=True)
    loaded = load_vae_from_state_dict(sd, dtype=torch.float32)
    assert loaded.config == config

    pixels = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for model in (fresh.eval(), loaded):
            m0, lv0 = ours.encode(pixels)
            m1, lv1 = model.encode(pixels)
            assert torch.equal(m0, m1) and torch.equal(lv0, lv1)
            assert torch.equal(ours.decode(z), model.decode(z))


def test_missing_key_is_named():
    sd = dict(AutoencoderKL(CONFIGS["small"]).state_dict())
    del sd["post_quant_conv.weight"]
    with pytest.raises(KeyError, match=r"post_quant_conv\.weight"):
        vae_config_from_state_dict(sd)

    sd = dict(AutoencoderKL(CONFIGS["small"]).state_dict())
    del sd["decoder.up.1.block.1.norm2.bias"]
    with pytest.raises(KeyError, match=r"decoder\.up\.1\.block\.1\.norm2\.bias"):
        load_vae_from_state_dict(sd)

    sd = dict(AutoencoderKL(CONFIGS["small"]).state_dict())
    del sd["decoder.up.1.block.1.norm2.bias"]
    with pytest.raises(RuntimeError, match=r"decoder\.up\.1\.block\.1\.norm2\.bias"):
        AutoencoderKL(CONFIGS["small"]).load_state_dict(sd)


def test_latent_round_trip_shapes_and_scaling():
    config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.5)
    model = _random_vae(config, seed=6)
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        mean, _ = model.encode(images * 2 - 1)
        latents = model.encode_latents(images)
        assert latents.shape == (3, 4, 8, 12)
        torch.testing.assert_close(latents, mean * 0.5)

        decoded = model.decode_latents(latents)
        assert decoded.shape == images.shape
        assert decoded.min() >= 0 and decoded.max() <= 1
        torch.testing.assert_close(decoded, ((model.decode(mean) + 1) / 2).clamp(0, 1))

        # Per-image generators: an image's sample does not depend on its batch neighbours.
        gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
        batch = model.encode_latents(images, generator=gens)
        alone = model.encode_latents(images[1:2], generator=torch.Generator().manual_seed(11))
        torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batch, latents)

    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype):
    config = CONFIGS["small"]
    ref = _random_vae(config, seed=9)
    model = _random_vae(config, seed=9).to(dtype)
    images = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = model.encode_latents(images, generator=torch.Generator().manual_seed(1))
        assert latents.dtype == dtype
        decoded = model.decode_latents(latents)
        assert decoded.dtype == dtype and decoded.shape == images.shape
        assert torch.isfinite(decoded).all()
        # Loose agreement with float32: this is a smoke test of the dtype plumbing, not of accuracy.
        expected = ref.decode_latents(latents.float())
        assert (decoded.float() - expected).abs().max().item() < 0.1
