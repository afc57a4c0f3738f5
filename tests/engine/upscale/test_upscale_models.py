"""Model upscalers and tiling: small random-weight ESRGAN (RRDBNet) and Real-ESRGAN Compact files in the real
layouts, saved as .safetensors and .pth, loaded through spandrel; the scale contract; refusals with the file
named; the tile grid and its feathered blend; tiled against untiled output."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.checkpoint import MAX_HEADER_BYTES
from engine.upscale.networks import UpscalerError, clear_upscalers, inspect_upscaler, lanczos, load_upscaler
from engine.upscale.random_models import random_compact, random_esrgan, write_upscaler
from engine.tiling import AUTO_TILE_PIXELS, balanced_tile, plan_tiles, resolve_tile, run_tiled, tile_starts

# Receptive-field radius, in input pixels, of the test networks: a pixel further than this from a tile's inner
# edge sees exactly what it would see in the whole image. ESRGAN with one RRDB: 17 convolutions at input
# resolution (first, 3 RDBs x 5, trunk) plus fractions at the upsampled ones, rounded up. Compact, 2 body convs: 4.
RADIUS = {"esrgan": 19, "compact": 4}
# Largest difference allowed at the seams with the default 32 px overlap, in [0, 1] units: 2 of 255 levels,
# invisible (8-bit output rounds away half of it). Measured: 1.64 / 255 for both test networks.
SEAM_BOUND = 2 / 255


@pytest.fixture(scope="module")
def upscaler_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upscalers")
    nets = {"esrgan": random_esrgan(num_filters=8, num_blocks=1, scale=4, seed=1), "compact": random_compact(scale=2, seed=2)}
    files = {}
    for name, net in nets.items():
        files[f"{name}.safetensors"] = write_upscaler(net, root / f"{name}.safetensors", {"modelspec.title": f"random-{name}"})
        files[f"{name}.pth"] = write_upscaler(net, root / f"{name}.pth")
    return files


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_upscalers()
    yield
    clear_upscalers()


def smooth_image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: coarse colour blobs plus fine noise, like a rendered picture has both."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=gen), size=(height, width),
                           mode="bilinear", align_corners=False)
    return (0.85 * coarse + 0.15 * torch.rand(1, 3, height, width, generator=gen)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("arch, name, scale", [("esrgan", "ESRGAN", 4), ("compact", "RealESRGAN Compact", 2)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_spandrel_loads_the_file_and_reads_its_scale(upscaler_files: dict[str, Path], arch: str, name: str, scale: int,
                                                     suffix: str) -> None:
    """Both file formats load through spandrel; the architecture and the scale come from the weights."""
    path = upscaler_files[f"{arch}{suffix}"]
    up = load_upscaler(path)
    assert (up.info.arch, up.scale, up.info.purpose) == (name, scale, "SR")
    assert len(up.info.sha256) == 64 and up.info.short_hash == up.info.sha256[:10]
    assert up.info.name == (f"random-{arch}" if suffix == ".safetensors" else arch)
    assert inspect_upscaler(path) == up.info


@pytest.mark.parametrize("arch", ["esrgan", "compact"])
@pytest.mark.parametrize("size", [(40, 24), (33, 17), (1, 1)])
def test_upscale_keeps_the_size_contract(upscaler_files: dict[str, Path], arch: str, size: tuple[int, int]) -> None:
    """An image of W x H comes out scale*W x scale*H, odd sizes included."""
    up = load_upscaler(upscaler_files[f"{arch}.safetensors"])
    image = Image.fromarray((smooth_image(*size)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    out = up.upscale(image)
    assert out.size == (size[0] * up.scale, size[1] * up.scale) and out.mode == "RGB"


@pytest.mark.parametrize("arch", ["esrgan", "compact"])
def test_safetensors_and_pth_of_one_network_agree(upscaler_files: dict[str, Path], arch: str) -> None:
    x = smooth_image(24, 16)
    a = load_upscaler(upscaler_files[f"{arch}.safetensors"]).upscale_tensor(x)
    b = load_upscaler(upscaler_files[f"{arch}.pth"]).upscale_tensor(x)
    assert torch.equal(a, b)
    assert a.std() > 0.01  # the random network's output carries signal, so the comparisons here mean something


def test_loaded_upscalers_are_cached_per_process(upscaler_files: dict[str, Path]) -> None:
    path = upscaler_files["compact.safetensors"]
    assert load_upscaler(path) is load_upscaler(path)
    assert load_upscaler(path, sha256=load_upscaler(path).info.sha256) is load_upscaler(path)


def test_a_pin_that_does_not_match_the_file_is_refused(upscaler_files: dict[str, Path]) -> None:
    path = upscaler_files["compact.safetensors"]
    with pytest.raises(UpscalerError, match=r"compact.safetensors: has sha256 [0-9a-f]{64}, but the chain pins 0{64}"):
        load_upscaler(path, sha256="0" * 64)


def test_unusable_files_are_refused_naming_the_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Missing files, SD checkpoints, pickled objects (never unpickled) and junk: each a clear UpscalerError."""
    with pytest.raises(UpscalerError, match=r"gone.pth: no such upscaler file"):
        load_upscaler(tmp_path / "gone.pth")
    with pytest.raises(UpscalerError, match=r"tiny-sd1.safetensors: spandrel does not recognise this architecture"):
        inspect_upscaler(tiny_checkpoint)
    evil = tmp_path / "evil.pth"
    torch.save({"model": Path("/etc/passwd")}, evil)  # an arbitrary object: weights-only loading must refuse it
    with pytest.raises(UpscalerError, match=r"evil.pth: cannot be read as a weights-only PyTorch file") as info:
        load_upscaler(evil)
    # One line saying why, without torch's advice to unpickle unrestricted.
    message = str(info.value)
    assert "PosixPath" in message and "a pickle can run code" in message
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(UpscalerError, match=r"junk.safetensors: not a safetensors file"):
        load_upscaler(junk)
    with pytest.raises(UpscalerError, match=r"picture.png: not an upscaler model file"):
        inspect_upscaler(tmp_path / "picture.png")


def test_upscaler_safetensors_with_a_crafted_header_is_refused(tmp_path: Path) -> None:
    """Upscaler files go through the checkpoint header checks: a nested or oversized header is a one-line error."""
    nested = tmp_path / "nested.safetensors"
    body = b'{"a": ' + b"[" * 100_000
    nested.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(UpscalerError, match=r"nested.safetensors: corrupt safetensors header \(JSON nested too deep"):
        load_upscaler(nested)
    huge = tmp_path / "huge.safetensors"
    n = MAX_HEADER_BYTES + 8
    with huge.open("wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n)  # sparse: claims the header, holds no data
    with pytest.raises(UpscalerError, match=rf"huge.safetensors: safetensors header of {n} bytes is over the"):
        inspect_upscaler(huge)


def test_truncated_pth_is_refused(upscaler_files: dict[str, Path], tmp_path: Path) -> None:
    data = upscaler_files["compact.pth"].read_bytes()
    assert zipfile.is_zipfile(io.BytesIO(data))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UpscalerError, match="cut.pth: cannot be read as a weights-only PyTorch file"):
        load_upscaler(cut)


def test_lanczos_scales_each_side() -> None:
    assert lanczos(Image.new("RGB", (30, 20)), 1.5).size == (45, 30)
    assert lanczos(Image.new("RGB", (3, 3)), 0.1).size == (1, 1)


# ------------------------------------------------------------------------------------------------ the tile grid


@pytest.mark.parametrize("length, tile, overlap, align", [(100, 32, 8, 1), (96, 32, 8, 8), (1024, 512, 32, 1), (33, 16, 4, 1),
                                                          (4096, 512, 64, 8), (40, 64, 8, 1)])
def test_tiles_cover_everything_with_at_least_the_overlap(length: int, tile: int, overlap: int, align: int) -> None:
    starts = tile_starts(length, tile, overlap, align)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    assert all(s % align == 0 for s in starts)
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + t - b >= overlap  # neighbours overlap by at least `overlap`
    assert tile_starts(length, tile, overlap, align) == starts  # a function of the sizes only


@pytest.mark.parametrize("length, tile, overlap, align, expected", [
    (1024, 512, 32, 1, 363), (1024, 512, 32, 8, 368), (900, 512, 32, 1, 466), (400, 512, 32, 1, 400), (1000, 500, 0, 1, 500)])
def test_balanced_tiles_are_the_smallest_of_the_same_count(length: int, tile: int, overlap: int, align: int, expected: int) -> None:
    size = balanced_tile(length, tile, overlap, align)
    assert size == expected and size % align == 0
    assert len(tile_starts(length, size, overlap, align)) == len(tile_starts(length, min(tile, length), overlap, align))


@pytest.mark.parametrize("balance", [False, True])
def test_feather_weights_sum_to_one(balance: bool) -> None:
    """Blending a constant through the tiler returns the constant: the ramps of neighbours add up to one."""
    x = torch.full((1, 1, 70, 90), 0.37)
    out = run_tiled(x, lambda part, _: part.clone(), tile=32, overlap=12, balance=balance)
    assert torch.allclose(out, x, atol=1e-6)


def test_tiled_identity_and_scaled_functions_are_exact() -> None:
    """A per-pixel function, tiled, equals the function untiled (also at a fractional scale, as the VAE encoder)."""
    x = smooth_image(72, 56)
    assert torch.allclose(run_tiled(x, lambda p, _: p * 2 - 1, tile=24, overlap=8), x * 2 - 1, atol=1e-6)
    up = run_tiled(x, lambda p, _: F.interpolate(p, scale_factor=4, mode="nearest"), tile=24, overlap=8, scale=4)
    assert torch.allclose(up, F.interpolate(x, scale_factor=4, mode="nearest"), atol=1e-6)
    from fractions import Fraction

    down = run_tiled(x, lambda p, _: F.avg_pool2d(p, 8), tile=32, overlap=16, scale=Fraction(1, 8), align=8)
    assert torch.allclose(down, F.avg_pool2d(x, 8), atol=1e-6)


def test_tile_choice_is_automatic_above_the_pixel_budget() -> None:
    assert resolve_tile(None, AUTO_TILE_PIXELS, 512) is None
    assert resolve_tile(None, AUTO_TILE_PIXELS + 1, 512) == 512
    assert resolve_tile(0, 10**9, 512) is None  # 0 = never
    assert resolve_tile(256, 16, 512) == 256  # forced


# ------------------------------------------------------------------------------------------------ tiled vs untiled


def _seam_mask(height: int, width: int, tile: int, overlap: int, radius: int, scale: int) -> np.ndarray:
    """Output pixels within ``radius`` (input pixels) of an inner tile edge: where tiles may disagree."""
    plan = plan_tiles(height, width, tile, overlap, balance=True)  # the grid the upscaler uses
    near = np.zeros((height * scale, width * scale), dtype=bool)
    for starts, size, length, axis in ((plan.ys, plan.tile_h, height, 0), (plan.xs, plan.tile_w, width, 1)):
        edges = [s for s in starts if s > 0] + [s + size for s in starts if s + size < length]
        for e in edges:
            lo, hi = max(0, (e - radius) * scale), min(length * scale, (e + radius) * scale)
            if axis == 0:
                near[lo:hi, :] = True
            else:
                near[:, lo:hi] = True
    return near


@pytest.mark.parametrize("arch", ["esrgan", "compact"])
def test_tiled_matches_untiled_away_from_seams_and_seams_stay_within_bound(upscaler_files: dict[str, Path], arch: str) -> None:
    """Tiles of 96 input pixels with the default 32-pixel overlap: far from the seams the numbers are the untiled
    ones; at the seams the feathered blend stays within SEAM_BOUND."""
    up = load_upscaler(upscaler_files[f"{arch}.safetensors"])
    h, w, tile, overlap = 144, 160, 96, 32
    x = smooth_image(w, h, seed=3)
    whole = up.upscale_tensor(x, tile=0)
    calls: list[tuple[int, int]] = []
    tiled = up.upscale_tensor(x, tile=tile, progress=lambda done, total: calls.append((done, total)))
    assert tiled.shape == whole.shape == (1, 3, h * up.scale, w * up.scale)
    plan = plan_tiles(h, w, tile, overlap, balance=True)
    assert plan.count == 4 and calls[-1] == (4, 4)  # really tiled, progress per tile

    diff = (tiled - whole).abs()[0].amax(0).numpy()
    near = _seam_mask(h, w, tile, overlap, RADIUS[arch], up.scale)
    assert near.mean() < 0.9 and (~near).sum() > 1000  # a real "away from seams" region to compare
    assert diff[~near].max() < 1e-5  # away from seams: the same numbers
    assert diff.max() <= SEAM_BOUND  # at the seams: feathered to an invisible difference
    assert diff[near].max() > 1e-6  # and the seams really are where tiles differ (the test can see them)


def test_tiled_is_deterministic_and_does_not_depend_on_anything_but_sizes(upscaler_files: dict[str, Path]) -> None:
    up = load_upscaler(upscaler_files["esrgan.pth"])
    x = smooth_image(64, 48, seed=9)
    assert torch.equal(up.upscale_tensor(x, tile=32, overlap=8), up.upscale_tensor(x.clone(), tile=32, overlap=8))


def test_auto_tiling_kicks_in_above_the_budget_only(upscaler_files: dict[str, Path]) -> None:
    """A 2x model on 1024 x 520 input (output above the budget) tiles by itself: the result differs from the
    untiled one only near seams; a small image is never tiled."""
    up = load_upscaler(upscaler_files["compact.safetensors"])
    x = smooth_image(1024, 520, seed=5)
    assert 1024 * 520 * 4 > AUTO_TILE_PIXELS
    auto, never = up.upscale_tensor(x), up.upscale_tensor(x, tile=0)
    d = (auto - never).abs()
    assert 0 < d.max() <= SEAM_BOUND
    small = smooth_image(64, 64)
    assert torch.equal(up.upscale_tensor(small), up.upscale_tensor(small, tile=0))
