"""txt2img / img2img / inpaint behaviour of the engine on a tiny random SD1-layout checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.image_ops import Outpaint, outpaint_canvas
from engine.pipeline import Pipeline, with_seeds
from engine.request_limits import SEED_MAX, DeviceBudget, RequestError, available_memory, human_bytes
from tests.helpers import arr, make_req

SIZE = 32
req = make_req(prompt="a red cube on a blue background", seed=7, width=SIZE, height=SIZE)


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_inpaint_checkpoint: Path) -> Pipeline:
    return Pipeline.load(tiny_inpaint_checkpoint, device="cpu", dtype="float32")


def gradient_image(w: int = SIZE, h: int = SIZE) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 90.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM"])
def test_same_seed_same_image_whatever_the_batch(pipe: Pipeline, sampler: str) -> None:
    requests = with_seeds(req(sampler=sampler, prompt="a green ball"), 3)  # seeds 7, 8, 9
    together = pipe.generate(requests)
    alone = [pipe.generate([r])[0] for r in requests]
    shuffled = pipe.generate([requests[2], requests[0], requests[1]])
    for a, b in zip(together, alone):
        assert a.request.seed == b.request.seed
        # Batched float32 GEMMs may round differently from batch-1 ones; a pixel may move by one level.
        assert np.abs(arr(a.image) - arr(b.image)).max() <= 1
    assert np.abs(arr(shuffled[1].image) - arr(together[0].image)).max() <= 1
    assert np.abs(arr(together[0].image) - arr(together[1].image)).mean() > 2  # different seeds differ


def test_same_seed_same_bytes_whatever_the_batch_on_the_cpu(pipe: Pipeline) -> None:
    """On the CPU every image goes through the networks alone (``batch_invariant``), so a batch never moves a byte,
    at a size where batched matrix kernels round differently on some CPUs; whole batches (a GPU's way) stay within
    one level."""
    requests = [req(seed=s, width=64, height=48, prompt="a red cube on a blue floor") for s in range(40, 46)]
    assert pipe.batch_invariant
    together = pipe.generate(requests)
    for r, a in zip(requests, together, strict=True):
        assert pipe.generate([r])[0].image.tobytes() == a.image.tobytes()
    pipe.batch_invariant = False  # as on a GPU: whole batches per network call
    try:
        batched = pipe.generate(requests)
    finally:
        pipe.batch_invariant = True
    diffs = [np.abs(arr(a.image) - arr(b.image)).max() for a, b in zip(together, batched)]
    assert max(diffs) <= 1


def test_repeatable_bit_for_bit(pipe: Pipeline) -> None:
    a = pipe.generate([req()])[0].image.tobytes()
    b = pipe.generate([req()])[0].image.tobytes()
    assert a == b


def test_mixed_requests_are_grouped_and_returned_in_order(pipe: Pipeline) -> None:
    calls: list[tuple[int, int]] = []
    requests = [req(seed=1), req(seed=2, width=48), req(seed=3), req(seed=4, steps=2, sampler="Euler")]
    results = pipe.generate(requests, progress=lambda d, t: calls.append((d, t)))
    assert [r.request.seed for r in results] == [1, 2, 3, 4]
    assert [r.image.size for r in results] == [(SIZE, SIZE), (48, SIZE), (SIZE, SIZE), (SIZE, SIZE)]
    # Three batches: (32x32, 4 steps) x2 images, (48x32, 4 steps), (Euler 2 steps) -> 4 + 4 + 2 steps.
    assert calls[-1] == (10, 10) and len(calls) == 10
    single = pipe.generate([requests[2]])[0]
    assert np.abs(arr(single.image) - arr(results[2].image)).max() <= 1


def test_negative_prompt_and_cfg(pipe: Pipeline) -> None:
    plain = arr(pipe.generate([req(cfg_scale=7.0)])[0].image)
    negative = arr(pipe.generate([req(cfg_scale=7.0, negative_prompt="red, blurry")])[0].image)
    assert np.abs(plain - negative).mean() > 1
    # At CFG 1 the uncond branch is skipped, so the negative prompt cannot matter.
    one_a = pipe.generate([req(cfg_scale=1.0)])[0].image.tobytes()
    one_b = pipe.generate([req(cfg_scale=1.0, negative_prompt="red, blurry")])[0].image.tobytes()
    assert one_a == one_b


def test_prompt_weights_long_prompts_and_clip_skip_change_the_image(pipe: Pipeline) -> None:
    base = arr(pipe.generate([req(prompt="a red cube")])[0].image)
    weighted = arr(pipe.generate([req(prompt="a (red:1.6) cube")])[0].image)
    skip2 = arr(pipe.generate([req(prompt="a red cube", clip_skip=2)])[0].image)
    long = arr(pipe.generate([req(prompt="a red cube, " + "shiny studio lighting, " * 30)])[0].image)
    # A random tiny text encoder moves the image only a little; any change proves the path is wired.
    for other in (weighted, skip2, long):
        assert not np.array_equal(base, other)


def test_parameters_describe_the_render(pipe: Pipeline) -> None:
    result = pipe.generate([req(sampler="euler_a", clip_skip=2, cfg_scale=6.5)])[0]
    p = result.parameters
    assert p["Sampler"] == "Euler a" and p["CFG scale"] == "6.5" and p["Seed"] == "7" and p["Clip skip"] == "2"
    assert p["Size"] == f"{SIZE}x{SIZE}" and p["Steps"] == "4"
    assert p["Model"] == "tiny-sd1" and len(p["Model hash"]) == 10
    assert p["Model hash"] == pipe.models.checkpoint.sha256[:10]


def test_img2img_runs_the_tail_of_the_schedule(pipe: Pipeline) -> None:
    init = gradient_image()
    steps: list[int] = []
    out = pipe.generate([req(init_image=init, strength=0.5, steps=10)], progress=lambda d, t: steps.append(t))[0]
    assert steps[-1] == 5  # int(10 * 0.5)
    assert out.parameters["Denoising strength"] == "0.5"
    other = pipe.generate([req(init_image=init.transpose(Image.Transpose.FLIP_LEFT_RIGHT), strength=0.5, steps=10)])[0]
    assert np.abs(arr(out.image) - arr(other.image)).mean() > 1  # the init image matters
    again = pipe.generate([req(init_image=init, strength=0.5, steps=10)])[0]
    assert again.image.tobytes() == out.image.tobytes()


def test_img2img_low_strength_stays_near_the_vae_round_trip(pipe: Pipeline) -> None:
    init = gradient_image()
    weak = arr(pipe.generate([req(init_image=init, strength=0.05, steps=20)])[0].image)
    strong = arr(pipe.generate([req(init_image=init, strength=1.0, steps=20)])[0].image)
    vae = pipe.models.vae
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(init, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        roundtrip = (vae.decode_latents(vae.encode_latents(x))[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(weak - roundtrip).mean() < np.abs(strong - roundtrip).mean()


def test_inpaint_keeps_unmasked_pixels_exactly(pipe: Pipeline) -> None:
    init = gradient_image()
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    result = pipe.generate([req(init_image=init, mask=Image.fromarray(mask, "L"), mask_blur=2, strength=1.0)])[0]
    out, src = arr(result.image), arr(init)
    # Far from the (blurred) mask edge the pixels are the input's, bit for bit.
    assert np.array_equal(out[:2], src[:2]) and np.array_equal(out[:, -2:], src[:, -2:])
    assert np.abs(out[12:20, 12:20] - src[12:20, 12:20]).mean() > 5
    assert result.parameters["Mask blur"] == "2"


def test_outpaint_extends_the_canvas(pipe: Pipeline) -> None:
    init = gradient_image()
    canvas, mask = outpaint_canvas(init, Outpaint.parse("left:16,bottom:8").rounded(init.size))
    assert canvas.size == (SIZE + 16, SIZE + 8)
    result = pipe.generate(
        [req(init_image=canvas, mask=mask, mask_blur=0, width=canvas.width, height=canvas.height, strength=1.0)]
    )[0]
    out = arr(result.image)
    assert result.image.size == (48, 40)
    # The original is untouched outside the repainted band (new area + 16 px overlap on the extended sides).
    assert np.array_equal(out[:16, 32:], arr(init)[:16, 16:])
    assert np.array_equal(arr(mask)[:16, 32:], np.zeros((16, 16))) and arr(mask)[:, :32].min() == 255
    assert np.abs(out[:, :12] - arr(canvas)[:, :12]).mean() > 2


def test_outpaint_spec_parsing() -> None:
    assert Outpaint.parse("left:128") == Outpaint(left=128)
    assert Outpaint.parse("up:8, right:4") == Outpaint(top=8, right=4)
    assert Outpaint.parse("right:3").rounded((64, 64)) == Outpaint(right=8)
    for bad in ("", "left", "middle:8", "left:x", "left:-8"):
        with pytest.raises(ValueError, match="outpaint"):
            Outpaint.parse(bad)


def test_inpainting_model_uses_mask_and_masked_image(inpaint_pipe: Pipeline) -> None:
    assert inpaint_pipe.models.is_inpainting
    init = gradient_image()
    m1 = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m1[:, :16] = 255
    m2 = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m2[:16, :] = 255
    a = inpaint_pipe.generate([req(init_image=init, mask=Image.fromarray(m1, "L"), mask_blur=0, strength=1.0)])[0]
    b = inpaint_pipe.generate([req(init_image=init, mask=Image.fromarray(m2, "L"), mask_blur=0, strength=1.0)])[0]
    # Same seed and prompt, different masks: the extra U-Net channels change the repainted area itself.
    assert np.abs(arr(a.image)[16:, :16] - arr(b.image)[16:, :16]).mean() > 1
    assert np.array_equal(arr(a.image)[:, 16:], arr(init)[:, 16:])
    txt = inpaint_pipe.generate([req()])[0]  # txt2img on an inpainting model: all-repaint mask, blank image
    assert txt.image.size == (SIZE, SIZE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(width=30), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(strength=0.0, init_image=Image.new("RGB", (SIZE, SIZE))), "strength"),
        (dict(mask=Image.new("L", (SIZE, SIZE))), "init image"),
        (dict(sampler="Heun++"), "Heun"),
        (dict(seed=-1), "seed"),
        (dict(cfg_scale=-2.0), "cfg"),
    ],
)
def test_bad_requests_are_refused_before_rendering(pipe: Pipeline, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.generate([req(), replace(req(), **change)])


# ---- limits: seeds and sizes refused before anything is allocated ------------------------------------------------


@pytest.mark.parametrize(
    ("change", "params", "message"),
    [
        (dict(width=100000, height=100000), ("width",), "width 100000 is over the 8192 px limit of a side"),
        (dict(height=8200), ("height",), "height 8200 is over the 8192 px"),
        (dict(width=4104, height=4096), ("width",), "untiled render"),
        (dict(seed=2**63), ("seed",), r"seed must be an integer in \[0, 2\*\*63 - 1"),
        (dict(seed=10**5000), ("seed",), "a 16610-bit number"),
    ],
)
def test_impossible_sizes_and_seeds_are_refused_naming_the_field(pipe: Pipeline, change: dict, params: tuple,
                                                                   message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_allocation(*args, **kwargs):
        raise AssertionError("the request reached the networks")

    monkeypatch.setattr(pipe, "_run_batch", no_allocation)
    with pytest.raises(RequestError, match=message) as info:
        pipe.generate([replace(req(), **change)])
    assert info.value.params == params and "\n" not in str(info.value)


def test_tiled_passes_may_be_larger_than_untiled_ones() -> None:
    init = Image.new("RGB", (8, 8))
    assert replace(req(), width=8192, height=4096, init_image=init).tiled  # img2img above 1 Mpx tiles by itself
    replace(req(), width=8192, height=4096, init_image=init).validate()
    replace(req(), width=8192, height=4096, tile=512).validate()
    with pytest.raises(RequestError, match="untiled"):
        replace(req(), width=8192, height=4096, init_image=init, tile=0).validate()


def test_a_size_one_image_of_which_cannot_fit_the_device_is_refused(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = DeviceBudget.for_models(pipe.models)
    need = budget.floor_bytes(1024, 1024, tiled=False)
    assert need == 1024 * 1024 * 2 * pipe.models.vae.config.ch * 4  # float32 on the CPU
    monkeypatch.setattr("engine.request_limits.available_memory", lambda device: need // 2)
    with pytest.raises(RequestError, match=rf"1024x1024 needs at least {human_bytes(need)} for one image on cpu \(untiled\) "
                                           rf"but {human_bytes(need // 2)} is free") as info:
        pipe.generate([replace(req(), width=1024, height=1024)])
    assert info.value.params == ("width", "height")
    monkeypatch.setattr("engine.request_limits.available_memory", lambda device: need - 1)
    with pytest.raises(RequestError):
        replace(req(), width=1024, height=1024).validate(budget)
    monkeypatch.setattr("engine.request_limits.available_memory", lambda device: need)
    replace(req(), width=1024, height=1024).validate(budget)  # exactly enough passes
    assert available_memory(torch.device("cpu")) > 0  # this machine's own answer is a number of bytes


def test_seeds_never_wrap() -> None:
    top = req(seed=SEED_MAX - 1)
    assert [r.seed for r in with_seeds(top, 2)] == [SEED_MAX - 1, SEED_MAX]
    with pytest.raises(RequestError, match=f"3 images from seed {SEED_MAX - 1} need seeds up to {SEED_MAX + 1}") as info:
        with_seeds(top, 3)
    assert info.value.params == ("seed", "n")
    with pytest.raises(RequestError, match="at least 1"):
        with_seeds(req(), 0)
