"""The decoder-only fine-tune (demo/decoder_tune.py): it lowers the reconstruction loss, changes no
weight outside the decoder's tuned blocks (so every latent stays what the U-Net learned), leaves flat areas
exactly as the analytic start draws them, and its training shortcut computes exactly what the full decoder
computes."""

from __future__ import annotations

import random

import torch

from demo.dataset import image_tensor
from demo.decoder_tune import decode_for_training, decoder_tune_parameters, train_decoder
from demo.scenes import random_scene
from tests.helpers import analytic_vae

SIZE = 64


def test_decoder_tune_lowers_the_loss_and_changes_only_the_tuned_blocks() -> None:
    torch.manual_seed(0)
    vae = analytic_vae().requires_grad_(False)
    rng = random.Random(3)
    images = image_tensor([random_scene(rng) for _ in range(4)], SIZE)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1)[0]
    # A flat 256-px image (32 latents across): the tuned blocks reach 11 latents (2 per block and level, at their
    # level's scale), so the middle 10 latents (80 px) only see flat input.
    flat = torch.tensor([0.9, 0.1, 0.4]).view(1, 3, 1, 1).expand(1, 3, 256, 256)
    with torch.no_grad():
        flat_z = vae.encode(flat * 2 - 1)[0]
        flat_before = vae.decode(flat_z)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    tuned = {id(p) for p in decoder_tune_parameters(vae)}
    tuned_names = {n for n, p in vae.named_parameters() if id(p) in tuned}

    def sample(n: int, gen: torch.Generator):
        idx = torch.randint(0, len(images), (n,), generator=gen)
        return z[idx], images[idx]

    global_state = torch.get_rng_state()
    losses = train_decoder(vae, sample, 60, batch_size=4, lr=2e-4, seed=0)
    assert torch.equal(torch.get_rng_state(), global_state)  # it draws from its own generator only
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= tuned_names
    assert not any(k.startswith(("encoder.", "quant_conv.", "post_quant_conv.", "decoder.up.0.", "decoder.conv_", "decoder.norm_out",
                                 "decoder.mid.attn_1.")) or k.endswith("conv2.bias") for k in changed)
    for k in changed:
        if k.endswith("conv2.weight"):  # zero-sum kernels: a locally constant input gives 0
            assert after[k].sum(dim=(2, 3)).abs().max() < 1e-6, k
    assert any(k.startswith("decoder.up.1.") for k in changed) and any(k.startswith("decoder.mid.") for k in changed)
    assert all(not p.requires_grad for p in vae.parameters())  # left frozen, ready for inference

    # The inside of a flat area stays flat, at the analytic start's colour to within a fraction of a level of 255
    # (the final GroupNorm's image-wide statistics see the border, which may move); the border need not.
    with torch.no_grad():
        flat_after = vae.decode(flat_z)
    inside = flat_after[:, :, 88:168, 88:168]
    assert (inside.amax(dim=(2, 3)) - inside.amin(dim=(2, 3))).max() < 1e-5
    assert (inside - flat_before[:, :, 88:168, 88:168]).abs().max() < 2 / 255  # [-1, 1] units: one level of 255
    assert not torch.allclose(flat_after, flat_before, atol=1e-3)  # the border did move

    # The training shortcut (level 0 left out: its blocks are still exactly the identity) is the full decoder.
    with torch.no_grad():
        full = vae.decode(z)
        short = decode_for_training(vae, z, skip_level0=True)
    assert torch.allclose(full, short, atol=1e-5)
