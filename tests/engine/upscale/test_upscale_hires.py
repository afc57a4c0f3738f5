"""The hires fix on the tiny random SD1 checkpoint: determinism (same seed, same bytes; another seed, another
image; batch and tiling do not change which noise a seed gets), sizes, A1111 infotext fields, tiled second
passes, and whole chains through :func:`engine.upscale.runner.run_chain`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.pipeline import GenerationRequest, Pipeline
from engine.upscale.chain import Hires, parse_chain
from engine.upscale.hires import hires_fix
from engine.upscale.networks import clear_upscalers, load_upscaler
from engine.upscale.random_models import random_compact, write_upscaler
from engine.upscale.runner import file_resolver, run_chain
from tests.helpers import arr, make_req

req = make_req(prompt="a red cube on a blue floor", seed=11, width=32, height=24)


@pytest.fixture(scope="module")
def compact_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_upscaler(random_compact(scale=2, seed=4), tmp_path_factory.mktemp("hires-up") / "x2-compact.safetensors")
    yield path
    clear_upscalers()


def png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def hires(pipe: Pipeline, requests: list[GenerationRequest], fix: Hires, **kw) -> list:
    return hires_fix(pipe, pipe.generate(requests), fix, **kw)


# ------------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_same_seed_same_bytes_other_seed_other_image(pipe: Pipeline, upscaler: str) -> None:
    fix = Hires(scale=2, denoise=0.5, steps=4, upscaler=upscaler)
    a, b = hires(pipe, [req(11)], fix)[0], hires(pipe, [req(11)], fix)[0]
    assert png(a.image) == png(b.image)
    other = hires(pipe, [req(12)], fix)[0]
    assert np.abs(arr(a.image) - arr(other.image)).mean() > 2


def test_a_seed_gives_its_image_whatever_the_batch(pipe: Pipeline) -> None:
    """The second pass draws its noise from the image's own generator: batch size and position do not matter
    (beyond the one level batched float32 GEMMs may move a pixel, as for any render)."""
    fix = Hires(scale=2, denoise=0.6, steps=4)
    together = hires(pipe, [req(21), req(22), req(23)], fix)
    alone = [hires(pipe, [req(s)], fix)[0] for s in (21, 22, 23)]
    for t, a in zip(together, alone):
        assert np.abs(arr(t.image) - arr(a.image)).max() <= 1


def test_the_second_pass_refines_the_first(pipe: Pipeline) -> None:
    """At a low denoise the hires latent keeps the first pass's picture: it is much closer to its own first-pass
    latent, upscaled, than to another seed's (compared as latents: a random VAE scrambles pixels)."""
    import torch.nn.functional as F

    first = pipe.generate([req(31), req(32)])
    out = hires_fix(pipe, first, Hires(scale=2, denoise=0.3, steps=10))
    size = tuple(out[0].latents.shape[-2:])
    own, other = (F.interpolate(f.latents[None], size=size, mode="bilinear", align_corners=False)[0] for f in first)
    assert (out[0].latents - own).abs().mean() < (out[0].latents - other).abs().mean() / 4


# ------------------------------------------------------------------------------------------------ sizes and fields


@pytest.mark.parametrize("scale, expected", [(2, (64, 48)), (1.5, (48, 40)), (3, (96, 72))])
def test_second_pass_size_is_scale_times_rounded_to_8(pipe: Pipeline, scale: float, expected: tuple[int, int]) -> None:
    out = hires(pipe, [req()], Hires(scale=scale, steps=2))[0]
    assert out.image.size == expected
    assert out.latents is not None and tuple(out.latents.shape[-2:]) == (expected[1] // 8, expected[0] // 8)


def test_infotext_fields_are_a1111s(pipe: Pipeline) -> None:
    """Size stays the first pass's; the hires fields are named as A1111 names them."""
    out = hires(pipe, [req()], Hires(scale=2, denoise=0.4, steps=12, upscaler="latent-nearest"))[0]
    p = out.parameters
    assert p["Size"] == "32x24" and p["Seed"] == "11" and p["Steps"] == "4"
    assert (p["Denoising strength"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"]) == ("0.4", "2", "12", "Latent (nearest)")
    assert "Hires steps" not in hires(pipe, [req()], Hires(scale=2, upscaler="lanczos"))[0].parameters


def test_second_pass_runs_denoise_times_steps(pipe: Pipeline) -> None:
    """Like any img2img, the second pass runs the last int(steps * denoise) steps of its schedule."""
    first = pipe.generate([req()])
    calls: list[tuple[int, int]] = []
    hires_fix(pipe, first, Hires(scale=2, denoise=0.5, steps=10), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (5, 5)


def test_model_upscaler_in_pixel_space(pipe: Pipeline, compact_file: Path) -> None:
    up = load_upscaler(compact_file)
    fix = Hires(scale=3, denoise=0.4, steps=4, upscaler=str(compact_file))
    a = hires(pipe, [req()], fix, upscaler=up)[0]
    assert a.image.size == (96, 72) and a.parameters["Hires upscaler"] == "x2-compact"
    assert png(a.image) == png(hires(pipe, [req()], fix, upscaler=up)[0].image)
    with pytest.raises(ValueError, match="needs its loaded model"):
        hires(pipe, [req()], fix)


# ------------------------------------------------------------------------------------------------ tiled second pass


def test_tiled_second_pass_is_deterministic_and_bounded_by_tiles(pipe: Pipeline) -> None:
    """A 4x hires forced into 64 px tiles: same seed same bytes, per-seed noise independent of the batch, and a
    tile as large as the image is exactly the untiled pass."""
    tiled = Hires(scale=4, denoise=0.5, steps=4, tile=64)
    a = hires(pipe, [req(41)], tiled)[0]
    assert a.image.size == (128, 96)
    assert png(a.image) == png(hires(pipe, [req(41)], tiled)[0].image)
    pair = hires(pipe, [req(42), req(41)], tiled)
    assert np.abs(arr(pair[1].image) - arr(a.image)).max() <= 1
    untiled = hires(pipe, [req(41)], replace(tiled, tile=0))[0]
    whole_tile = hires(pipe, [req(41)], replace(tiled, tile=128))[0]
    assert png(whole_tile.image) == png(untiled.image)
    assert np.abs(arr(a.image) - arr(untiled.image)).mean() > 0  # 64 px tiles really were tiles


def test_only_img2img_passes_tile_by_themselves(pipe: Pipeline) -> None:
    """Above the pixel budget a second pass tiles automatically (tiles of the model's native size); a txt2img
    render only when asked, since tiles would each compose their own picture."""
    import torch

    big = dict(width=2048, height=1024)
    assert pipe.tile_size(req(**big)) is None
    assert pipe.tile_size(req(**big, tile=256)) == 256
    assert pipe.tile_size(req(**big, init_latent=torch.zeros(4, 128, 256))) == pipe.models.native_size
    assert pipe.tile_size(req(**big, init_latent=torch.zeros(4, 128, 256), tile=0)) is None
    assert pipe.tile_size(req(width=512, height=512, init_latent=torch.zeros(4, 64, 64))) is None


def test_request_tile_is_validated() -> None:
    with pytest.raises(ValueError, match="tile must be 0"):
        req(tile=60).validate()
    with pytest.raises(ValueError, match="init image or an init latent"):
        import torch

        req(init_image=Image.new("RGB", (32, 24)), init_latent=torch.zeros(4, 3, 4)).validate()


# ------------------------------------------------------------------------------------------------ whole chains


def test_run_chain_delivers_the_exact_size_with_every_step(pipe: Pipeline, compact_file: Path) -> None:
    chain = parse_chain(f"hires(scale=2, denoise=0.4, steps=4) -> model({compact_file}) -> lanczos(scale=1.5) -> fit(200x90)")
    out = run_chain(pipe, [req(51), req(52)], chain)
    assert [r.image.size for r in out] == [(200, 90), (200, 90)]
    p = out[0].parameters
    assert p["Postprocess"] == chain.canonical(pins=False)
    up = load_upscaler(compact_file)
    assert p["Upscaler"] == f"x2-compact ({up.info.short_hash})" and p["Hires upscale"] == "2"
    again = run_chain(pipe, [req(51)], chain, resolve=file_resolver("cpu"))
    assert png(again[0].image) == png(out[0].image)


def test_run_chain_without_hires_only_post_processes(pipe: Pipeline) -> None:
    plain = pipe.generate([req(61)])[0]
    out = run_chain(pipe, [req(61)], parse_chain("lanczos(scale=2) -> fit(60x60)"))[0]
    assert out.image.size == (60, 60) and "Hires upscale" not in out.parameters
    assert out.parameters["Size"] == plain.parameters["Size"] == "32x24"
