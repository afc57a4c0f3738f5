"""The opt-in fast modes: their text form, token merging against a plain re-implementation, feature reuse that is
exact when nothing changed between calls, and what they do inside the pipeline (counts of full and shallow U-Net
calls, per-image sites, seeds, infotext)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.devices import BF16_ENV, resolve_dtype
from engine.fast_modes import FAST_OFF, FastMode, FastModeError
from engine.fast_steps import FastCall, FastSteps
from engine.pipeline import Pipeline
from engine.token_merge import TokenMerge
from engine.unet import UNetConfig, UNetModel
from tests.helpers import arr, make_req

SIZE = 32
req = make_req(prompt="a red cube on a blue background", seed=11, width=SIZE, height=SIZE, steps=9)


# ---- text form ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, canonical", [
    ("", ""), ("off", ""), ("cache:3", "cache:3"), (" Cache:3 ", "cache:3"), ("tome:0.50", "tome:0.5"),
    ("tome:0.5,cache:2:0", "cache:2:0,tome:0.5"), ("cache:4:1", "cache:4"), ("cache:1:3", ""),
])
def test_text_form_is_canonical(text: str, canonical: str) -> None:
    mode = FastMode.parse(text)
    assert str(mode) == canonical
    assert FastMode.parse(str(mode)) == mode
    assert mode.enabled == bool(canonical)


@pytest.mark.parametrize("text, words", [
    ("cache:x", "whole numbers"), ("cache:0", "1..10"), ("cache:11", "1..10"), ("tome:0.8", "[0, 0.75]"),
    ("tome:abc", "ratio"), ("warp:3", "unknown part 'warp:3'"), ("cache:2,cache:3", "given twice"),
    ("cache:2:-1", "branch must be >= 0"),
])
def test_bad_text_says_what_is_allowed(text: str, words: str) -> None:
    with pytest.raises(FastModeError, match="fast mode") as info:
        FastMode.parse(text)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_request_takes_the_text_and_keys_batches_by_mode() -> None:
    from engine.sampler_names import get_sampler

    a, b = req(fast="cache:3"), req(fast="")
    assert a.fast == FastMode(cache_interval=3) and b.fast == FAST_OFF
    sampler = get_sampler(a.sampler)
    assert a.batch_key(sampler) != b.batch_key(sampler)
    with pytest.raises(FastModeError):
        req(fast="cache:zero")


# ---- token merging ----------------------------------------------------------------------------------------------


def naive_merge(x: torch.Tensor, hw: tuple[int, int], ratio: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """ToMe's bipartite matching spelled out token by token for one image: which grid position each output token
    stands for after unmerging (its own, or the destination it was merged into), and the merged tokens' values."""
    h, w = hw
    gen = torch.Generator("cpu").manual_seed(seed)
    pick = torch.randint(0, 4, (h // 2, w // 2), generator=gen)
    dst = [(2 * i + int(pick[i, j]) // 2) * w + 2 * j + int(pick[i, j]) % 2 for i in range(h // 2) for j in range(w // 2)]
    src = [p for p in range(h * w) if p not in set(dst)]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = []
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        k = max(range(len(dst)), key=lambda i: (sims[i], -i))
        best.append((sims[k], s, dst[k]))
    r = min(int(h * w * ratio), len(src))
    merged = sorted(best, key=lambda t: -t[0])[:r]
    stands_for = list(range(h * w))
    groups: dict[int, list[int]] = {d: [d] for d in dst}
    for _, s, d in merged:
        stands_for[s] = d
        groups[d].append(s)
    value = x.clone()
    for d, members in groups.items():
        value[d] = x[members].mean(dim=0)
    return value, stands_for


def test_token_merge_matches_the_spelled_out_matching() -> None:
    torch.manual_seed(0)
    hw = (6, 8)
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    tome = TokenMerge(0.4, seed=5)
    merge, unmerge = tome.plan(x, hw)
    merged = merge(x)
    assert merged.shape == (2, hw[0] * hw[1] - int(48 * 0.4), 16)
    # unmerge(merge(x)): kept tokens come back as they were, merged ones as their destination's mean
    out = unmerge(merged)
    for b in range(2):
        value, stands_for = naive_merge(x[b], hw, 0.4, seed=5)
        torch.testing.assert_close(out[b], value[stands_for])


def test_token_merge_loses_nothing_when_cells_hold_equal_tokens() -> None:
    """Every 2x2 cell filled with one token: each source is merged into its own cell's destination, so attention over
    the merged tokens copied back is attention over the cell tokens, and the round trip is exact."""
    h, w, c = 4, 6, 8
    cell = torch.randn(1, c, h // 2, w // 2)
    grid = torch.nn.functional.interpolate(cell, scale_factor=2.0, mode="nearest")  # [1, c, h, w]
    x = grid.flatten(2).transpose(1, 2)
    merge, unmerge = TokenMerge(0.75, seed=1).plan(x, (h, w))
    assert merge(x).shape[1] == (h // 2) * (w // 2)
    torch.testing.assert_close(unmerge(merge(x)), x)


def test_token_merge_on_odd_grids_and_tiny_ratios() -> None:
    x = torch.randn(1, 5 * 7, 4)
    merge, unmerge = TokenMerge(0.5, seed=0).plan(x, (5, 7))
    assert merge(x).shape[1] == 35 - 17 and unmerge(merge(x)).shape == x.shape
    merge, unmerge = TokenMerge(0.01, seed=0).plan(x, (5, 7))
    assert merge(x) is x  # nothing to merge: the identity


# ---- feature reuse inside the U-Net -----------------------------------------------------------------------------


def tiny_unet() -> UNetModel:
    torch.manual_seed(3)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=2, context_dim=16)
    unet = UNetModel(cfg).eval()
    for p in unet.parameters():  # default init leaves zero-initialised outputs in places; make every path count
        p.data.add_(0.02 * torch.randn_like(p))
    return unet


@pytest.mark.parametrize("branch", [0, 1, 3, 6])
def test_shallow_call_over_fresh_features_is_the_full_call(branch: int) -> None:
    unet = tiny_unet()
    x, t, c = torch.randn(2, 4, 12, 10), torch.tensor([400.0, 400.0]), torch.randn(2, 5, 16)
    with torch.inference_mode():
        plain = unet(x, t, c)
        full = FastCall(branch=branch)
        assert torch.equal(unet(x, t, c, fast=full), plain)
        assert full.stored is not None
        shallow = unet(x, t, c, fast=FastCall(branch=branch, kept=full.stored))
    torch.testing.assert_close(shallow, plain, rtol=1e-5, atol=1e-5)


def test_shallow_call_runs_only_the_branch() -> None:
    unet = tiny_unet()
    ran: list[str] = []
    for name, block in [*((f"in{i}", b) for i, b in enumerate(unet.input_blocks)), ("middle", unet.middle_block),
                        *((f"out{i}", b) for i, b in enumerate(unet.output_blocks))]:
        block.register_forward_hook(lambda *_, n=name: ran.append(n))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 5, 16)
    with torch.inference_mode():
        full = FastCall(branch=1)
        unet(x, t, c, fast=full)
        assert len(ran) == 2 * len(unet.input_blocks) + 1
        ran.clear()
        unet(x, t, c, fast=FastCall(branch=1, kept=full.stored))
    n = len(unet.input_blocks)
    assert ran == ["in0", "in1", f"out{n - 2}", f"out{n - 1}"]


def test_fast_steps_schedule_and_sites() -> None:
    steps = FastSteps(FastMode(cache_interval=3), n_blocks=9)
    kinds = []
    for i, sigma in enumerate([9.0, 9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5]):  # a repeated sigma is the same evaluation (tiles)
        steps.step(torch.tensor([sigma]))
        call = steps.call(("image", 0))
        kinds.append("shallow" if call.shallow else "full")
        if not call.shallow:
            call.stored = torch.zeros(1)
        steps.done(("image", 0), call)
    assert kinds == ["full", "full", "shallow", "shallow", "full", "shallow", "shallow", "full"]
    assert steps.call(("image", 1)).shallow is False  # a site never seen runs whole, whatever the schedule says
    with pytest.raises(ValueError, match="cache branch 8"):
        FastSteps(FastMode(cache_interval=2, cache_branch=8), n_blocks=9)


# ---- in the pipeline --------------------------------------------------------------------------------------------


@pytest.fixture
def made(pipe: Pipeline, monkeypatch) -> list[FastSteps]:
    """Every fast-mode state the pipeline makes, in order (the instance's method, wrapped)."""
    out: list[FastSteps] = []
    real = pipe.fast_steps

    def spy(r):
        steps = real(r)
        if steps is not None:
            out.append(steps)
        return steps

    monkeypatch.setattr(pipe, "fast_steps", spy)
    return out


def test_pipeline_reuses_features_on_schedule_and_records_the_mode(pipe: Pipeline, made: list[FastSteps]) -> None:
    exact = pipe.generate([req(seed=s) for s in (1, 2)])
    cached = pipe.generate([req(seed=s, fast="cache:3") for s in (1, 2)])
    sampling = made[-1]
    # 9 evaluations per image, full at 0, 3, 6: per image 3 full and 6 shallow U-Net calls
    assert (sampling.full_calls, sampling.shallow_calls) == (6, 12)
    assert cached[0].parameters["Fast"] == "cache:3" and "Fast" not in exact[0].parameters
    for a, b in zip(exact, cached):
        diff = np.abs(arr(a.image) - arr(b.image))
        assert 0 < diff.mean() < 40  # a different computation of the same picture, not another picture


def test_fast_images_do_not_depend_on_the_batch(pipe: Pipeline) -> None:
    for mode in ("cache:2", "tome:0.5", "cache:3,tome:0.5"):
        requests = [req(seed=s, fast=mode) for s in (3, 4, 5)]
        together = pipe.generate(requests)
        for r, a in zip(requests, together):
            assert pipe.generate([r])[0].image.tobytes() == a.image.tobytes(), mode


def test_token_merging_changes_the_pixels_a_little(pipe: Pipeline) -> None:
    exact = pipe.generate([req(seed=21, width=64, height=64)])[0]
    merged = pipe.generate([req(seed=21, width=64, height=64, fast="tome:0.5")])[0]
    diff = np.abs(arr(exact.image) - arr(merged.image))
    assert 0 < diff.mean() < 40


def test_tiled_denoising_keeps_features_per_tile(pipe: Pipeline, made: list[FastSteps]) -> None:
    from PIL import Image

    init = Image.new("RGB", (128, 64), (120, 40, 200))
    r = req(seed=5, width=128, height=64, init_image=init, strength=0.9, tile=64, fast="cache:2")
    out = pipe.generate([r])[0]
    assert out.image.size == (128, 64) and out.parameters["Fast"] == "cache:2"
    sampling = made[-1]
    regions = {region for _, region in sampling._kept}
    assert len(regions) >= 2 and None not in regions  # each tile reuses its own features
    assert sampling.shallow_calls > 0


# ---- the CPU's default precision --------------------------------------------------------------------------------


def test_auto_dtype_follows_the_cpu(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv(BF16_ENV, "1")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu, training=True) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setenv(BF16_ENV, "0")
    assert resolve_dtype("auto", cpu) == torch.float32


def test_bfloat16_default_stays_close_to_float32(tiny_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setenv(BF16_ENV, "1")
    fast = Pipeline.load(tiny_checkpoint, device="cpu", dtype="auto")
    exact = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    assert fast.dtype == torch.bfloat16
    a = fast.generate([req(seed=9, width=64, height=64)])[0]
    b = exact.generate([req(seed=9, width=64, height=64)])[0]
    diff = np.abs(arr(a.image) - arr(b.image))
    assert diff.mean() < 3


def test_compiled_unet_draws_the_same_picture(tiny_checkpoint: Path) -> None:
    """torch.compile of the U-Net in place: the same module and parameters (a LoRA merge still reaches them), the
    same picture within rounding."""
    compiled = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    eager = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    names = [n for n, _ in compiled.models.unet.named_parameters()]
    compiled.compile_unet()
    compiled.compile_unet()  # twice is once
    assert [n for n, _ in compiled.models.unet.named_parameters()] == names
    r = req(seed=4, steps=3)
    a, b = compiled.generate([r])[0], eager.generate([r])[0]
    assert np.abs(arr(a.image) - arr(b.image)).max() <= 2


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_fast_modes_on_other_families(tmp_path_factory: pytest.TempPathFactory, family: str) -> None:
    """SD 2.x (linear projections, v-prediction) and SDXL (no attention at full resolution: tokens merge at the first
    level that has attention; fewer input blocks) take every mode, each a little off the exact picture."""
    from engine.random_checkpoint import write_random

    path = write_random(tmp_path_factory.mktemp("fast") / f"{family}.safetensors", family, seed=4)
    pipe = Pipeline.load(path, device="cpu", dtype="float32")
    exact = pipe.generate([req(seed=2, width=64, height=64)])[0]
    for mode in ("cache:3", "cache:2:0", "tome:0.5", "cache:3,tome:0.5"):
        out = pipe.generate([req(seed=2, width=64, height=64, fast=mode)])[0]
        diff = np.abs(arr(out.image) - arr(exact.image))
        assert 0 < diff.mean() < 40, (family, mode)
        assert out.parameters["Fast"] == mode


def test_cache_with_a_controlnet(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Shallow calls take the ControlNet's residuals for the blocks they run: a controlled fast render stays near the
    controlled exact one and away from the uncontrolled fast one."""
    from PIL import Image, ImageDraw

    from engine.adapters.refs import AdapterFile
    from engine.random_checkpoint import write_random
    from engine.random_controlnet import write_random_controlnet
    from engine.requests import ControlUse

    tmp = tmp_path_factory.mktemp("fast-cn")
    pipe = Pipeline.load(write_random(tmp / "sd1.safetensors", "sd1", seed=3), device="cpu", dtype="float32")
    net = write_random_controlnet(tmp / "cn.safetensors", "sd1", seed=13)
    layout = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(layout).rectangle((12, 16, 50, 44), fill="white")
    control = (ControlUse(AdapterFile("cn", str(net)), layout, "canny", 2.0),)
    exact = pipe.generate([req(seed=6, width=64, height=64, controls=control)])[0]
    fast = pipe.generate([req(seed=6, width=64, height=64, controls=control, fast="cache:2")])[0]
    free = pipe.generate([req(seed=6, width=64, height=64, fast="cache:2")])[0]
    near = np.abs(arr(fast.image) - arr(exact.image)).mean()
    assert 0 < near < np.abs(arr(fast.image) - arr(free.image)).mean()
