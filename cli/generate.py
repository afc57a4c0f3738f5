"""``adforge generate``: a prompt in, PNGs with A1111 infotext out (txt2img, img2img, inpaint, outpaint)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli.errors import console, fail, open_image

__all__ = ["app", "generate"]

app = typer.Typer()


def _next_index(out: Path) -> int:
    """A1111-style running number: continue after the highest existing ``NNNNN-*.png``, never overwrite."""
    highest = -1
    if out.is_dir():
        for p in out.iterdir():
            m = re.match(r"^(\d{5,})-", p.name)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest + 1


_OPTIONS = {"seed": "--seed", "n": "-n", "width": "--width", "height": "--height"}
# Every result (a PIL image, its latent) stays in memory until all are rendered: RGB plus a float32 latent at 1/8.
_RESULT_BYTES_PER_PIXEL = 3 + 4 * 4 / 64


def _bad(exc) -> typer.BadParameter:
    """A RequestError as a usage error naming the options to blame."""
    return typer.BadParameter(str(exc), param_hint=[_OPTIONS.get(p, p) for p in exc.params])


def _check_results_fit(n: int, width: int, height: int) -> None:
    import torch

    from engine.request_limits import RequestError, available_memory, human_bytes

    need = n * width * height * _RESULT_BYTES_PER_PIXEL
    have = available_memory(torch.device("cpu"))
    if have is not None and need > have:
        raise RequestError("n", f"{n} images of {width}x{height} are kept in memory until all are rendered: "
                                f"{human_bytes(need)}, but {human_bytes(have)} is free; ask for fewer per call")


def _check_blocklist(prompt: str, setting: str | None) -> None:
    """The prompt against the blocklist, as a campaign's rendered prompts are (the negative prompt is not checked);
    exit 2 naming the term, before the model loads."""
    from flows.content_filter import BlocklistError, load_blocklist
    from flows.safe_text import quoted

    try:
        terms = load_blocklist(setting)
    except BlocklistError as exc:
        raise fail(f"--blocklist: {exc}", 2) from None
    if terms is not None and (term := terms.find(prompt)) is not None:
        raise fail(f"the prompt holds the blocked term {quoted(term.text, 40)} ({term.source}); "
                   "rephrase it, or pass --blocklist with a list of your own", 2)


def _marked(image, infotext: str, setting: str):
    """The picture with the invisible watermark the setting asks for: ``on`` marks it with an adforge identifier of
    its infotext (the magic byte says adforge made it; no database holds it, unlike a campaign asset's)."""
    from storage.watermark import can_carry, embed_checked
    from storage.watermark_payload import adforge_payload, custom_payload

    if setting == "off" or not can_carry(image.width, image.height):
        return image
    payload = custom_payload(setting[5:]) if setting.startswith("text:") else adforge_payload(infotext)
    return embed_checked(image, payload)[0]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt, with A1111 weights: (word), [word], (word:1.3), BREAK.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", envvar="ADFORGE_MODEL", help="SD 1.x, SD 2.x or SDXL single-file checkpoint; default: the bundled demo model."),
    ] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    sampler: Annotated[str, typer.Option(help="Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM; LCM; Euler A Turbo "
                                                  "(SD-Turbo / SDXL-Turbo: 1-4 steps, --cfg 1); ... SGMUniform.")] = "DPM++ 2M Karras",
    steps: Annotated[int, typer.Option(min=1, max=500)] = 25,
    cfg: Annotated[float, typer.Option("--cfg", min=0.0, help="Classifier-free guidance scale.")] = 7.0,
    seed: Annotated[int, typer.Option(help="First seed; image i gets seed+i. -1 picks one at random.")] = -1,
    width: Annotated[int | None, typer.Option(min=8, help="Default: the init image's width, else the model's native size.")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Default: the init image's height, else the model's native size.")] = None,
    n: Annotated[int, typer.Option("-n", "--n-images", min=1, help="Number of images (seeds seed..seed+n-1).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per U-Net batch; results do not depend on it.")] = 4,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    init_image: Annotated[Path | None, typer.Option(help="img2img / inpaint source image.")] = None,
    strength: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Denoising strength (default 0.75; 1.0 when outpainting).")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask: white = repaint. Needs --init-image.")] = None,
    mask_blur: Annotated[int, typer.Option(min=0)] = 4,
    outpaint: Annotated[
        str | None, typer.Option(help="Extend the canvas of --init-image, e.g. left:128 or left:128,top:64.")
    ] = None,
    vae: Annotated[Path | None, typer.Option(help="Separate VAE file to use instead of the checkpoint's.")] = None,
    clip_skip: Annotated[int, typer.Option(min=1, help="2 = penultimate CLIP layer, as many anime models want.")] = 1,
    fast: Annotated[str, typer.Option(help="Fast mode, trading exactness for speed: cache:N (reuse deep U-Net features "
                                           "for N-1 of every N steps), tome:R (merge a share R of the tokens), both "
                                           "comma-separated, or off. Written into the infotext (Fast: ...).")] = "",
    compile_unet: Annotated[bool, typer.Option("--compile", help="torch.compile the U-Net: minutes once per process and "
                                                                  "image size, then faster steps; pays for many images "
                                                                  "(see README \"Speed\"). Same pixels within rounding.")] = False,
    blocklist: Annotated[
        str | None, typer.Option(envvar="ADFORGE_BLOCKLIST", help="Terms no prompt may hold: a file of terms, or off "
                                                                  "(default: the shipped templates/blocklist.txt).")
    ] = None,
    watermark: Annotated[
        str, typer.Option(envvar="ADFORGE_WATERMARK", help="The invisible watermark in every file: on (an adforge "
                                                            "identifier of the image), text:XXXX (8 ASCII characters "
                                                            "of your own) or off.")
    ] = "on",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 on CUDA; on the CPU bfloat16 where it has native bfloat16, else float32), float32, float16, bfloat16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="Allow .ckpt pickles (weights-only unpickling); trust the source.")] = False,
    prediction: Annotated[
        str | None, typer.Option(help="eps or v: what the model predicts, for SD 2.x files that do not say (default: "
                                      "the file's metadata, else v, or eps for SD 2.0-base's global_step).")
    ] = None,
    refiner: Annotated[
        Path | None, typer.Option(help="SDXL refiner checkpoint: finishes each image after the base model's share.")
    ] = None,
    refiner_switch: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Share of the schedule the base model runs before the refiner (A1111's switch at).")
    ] = 0.8,
    refiner_lora: Annotated[
        list[str] | None, typer.Option(help="A LoRA for the refiner's part, NAME or NAME:WEIGHT from --lora-dir (repeatable).")
    ] = None,
    lora_dir: Annotated[
        Path, typer.Option(envvar="ADFORGE_LORA_DIR", help="Where <lora:NAME:weight> tags find NAME.safetensors (.pt, .ckpt).")
    ] = Path("models/loras"),
    embeddings_dir: Annotated[
        Path, typer.Option(envvar="ADFORGE_EMBEDDINGS_DIR", help="Textual-inversion embeddings, used by writing their file name in a prompt.")
    ] = Path("models/embeddings"),
    control: Annotated[
        list[str] | None, typer.Option(help="ControlNet: TYPE:IMAGE[:STRENGTH[:START[:END]]] (repeatable), e.g. canny:layout.png:0.8; "
                                            "types canny, softedge (made from IMAGE), lineart, scribble, depth, pose, none (IMAGE as is).")
    ] = None,
    controlnet_dir: Annotated[
        Path, typer.Option(envvar="ADFORGE_CONTROLNET_DIR", help="ControlNet files; a type uses the one whose name carries its word.")
    ] = Path("models/controlnet"),
    control_model: Annotated[
        list[str] | None, typer.Option(help="TYPE=FILE_OR_NAME: the ControlNet for a type (repeatable).")
    ] = None,
) -> None:
    """Render images from a prompt (txt2img, img2img, inpaint, outpaint) into PNGs with A1111 infotext.

    LoRAs: A1111 tags in the prompt, <lora:NAME:0.8> or <lora:NAME:TE:UNET>, several at once. Embeddings: write
    the file's name in the prompt or --negative, with emphasis like any word: (easynegative:1.2)."""
    # Imported here so `adforge --help` stays instant (torch takes seconds to import).
    from engine.checkpoint import CheckpointError
    from engine.image_ops import Outpaint, outpaint_canvas
    from engine.pipeline import GenerationRequest, Pipeline, with_seeds
    from engine.request_limits import DeviceBudget, RequestError, check_seeds, check_size, size_problem
    from storage.image_metadata import encode_png, format_infotext, write_atomic, xmp_packet

    from engine.bundled import bundled_model_path

    if model is None:
        model = bundled_model_path()
        if not model.exists():
            raise typer.BadParameter(
                f"no model given and the bundled model {model} is missing: pass --model PATH.safetensors, set "
                "ADFORGE_MODEL, or rebuild it with `adforge train demo`",
                param_hint="--model",
            )
    from engine.fast_modes import FastMode, FastModeError

    try:
        fast_mode = FastMode.parse(fast)
    except FastModeError as exc:
        raise fail(f"--fast: {exc}", 2) from None
    _check_blocklist(prompt, blocklist)
    from storage.watermark_payload import watermark_setting

    try:
        watermark = watermark_setting(watermark)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--watermark") from None
    if prediction is not None and prediction not in ("eps", "v"):
        raise typer.BadParameter("eps or v", param_hint="--prediction")
    if mask is not None and init_image is None:
        raise typer.BadParameter("--mask needs --init-image", param_hint="--mask")
    if outpaint is not None and init_image is None:
        raise typer.BadParameter("--outpaint needs --init-image", param_hint="--outpaint")
    if outpaint is not None and mask is not None:
        raise typer.BadParameter("--outpaint makes its own mask; drop --mask", param_hint="--outpaint")
    # What can be refused before the model loads: seeds out of range, sides no pass may have, adapters not found.
    from engine.adapters.library import AdapterLibrary
    from engine.adapters.refs import AdapterError
    from engine.tokenizer import load_clip_tokenizer

    try:
        library = AdapterLibrary([lora_dir], [embeddings_dir])
        adapters = library.resolve(prompt, negative, load_clip_tokenizer())
        refiner_loras = tuple(_refiner_lora(library, text) for text in refiner_lora or ())
        if refiner_loras and refiner is None:
            raise typer.BadParameter("refiner LoRAs need --refiner", param_hint="--refiner-lora")
    except AdapterError as exc:
        raise fail(exc, 2) from None
    from cli.control_options import parse_control_models, parse_controls, resolve_controls

    control_specs = parse_controls(control)
    chosen_models = parse_control_models(control_model)
    try:
        if seed >= 0:
            check_seeds(seed, n)
        check_size(width or 8, height or 8, tiled=True)
    except RequestError as exc:
        raise _bad(exc) from None

    try:
        with console.status(f"loading {model.name}"):
            pipe = Pipeline.load(model, vae=vae, device=device, dtype=dtype, allow_pickle=allow_pickle, max_batch_size=batch_size,
                                 prediction=prediction)
        if compile_unet:
            pipe.compile_unet()
        if refiner is not None:
            with console.status(f"loading {refiner.name}"):
                pipe.refiner = Pipeline.load(refiner, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                             max_batch_size=batch_size)
            if pipe.refiner.models.family.latent_scale != pipe.models.family.latent_scale:
                raise ValueError(f"{refiner}: a {pipe.refiner.models.family.label} model cannot finish a "
                                 f"{pipe.models.family.label} image (their latents differ)")
    except (CheckpointError, ValueError) as exc:
        raise fail(exc, 2) from None

    init = open_image(init_image, "init image", "--init-image") if init_image else None
    mask_img = open_image(mask, "mask", "--mask") if mask else None
    if init is not None and outpaint is not None:
        try:
            pad = Outpaint.parse(outpaint).rounded(init.size)
            problem = size_problem(init.width + pad.left + pad.right, init.height + pad.top + pad.bottom, tiled=True)
            if problem:
                raise ValueError(f"the extended canvas: {problem[1]}")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--outpaint") from None
        init, mask_img = outpaint_canvas(init, pad)
        width, height = init.size
        strength = 1.0 if strength is None else strength
    elif init is not None:
        # img2img keeps the source's size unless told otherwise (rounded down to the VAE's multiple of 8).
        width = width or max(8, init.width // 8 * 8)
        height = height or max(8, init.height // 8 * 8)
    width, height = width or pipe.models.native_size, height or pipe.models.native_size
    if strength is None:
        strength = 0.75
    if init is not None and strength == 0.0:
        raise typer.BadParameter("strength 0 would change nothing; use a value in (0, 1]", param_hint="--strength")
    if seed < 0:
        seed = secrets.randbelow(2**32)
    pipe.controlnets.allow_pickle = allow_pickle
    try:
        controls = resolve_controls(control_specs, chosen_models, controlnet_dir, pipe, width, height)
    except CheckpointError as exc:
        raise fail(exc, 2) from None
    try:
        check_seeds(seed, n)
        _check_results_fit(n, width, height)
    except RequestError as exc:
        raise _bad(exc) from None

    base = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        cfg_scale=cfg,
        sampler=sampler,
        clip_skip=clip_skip,
        fast=fast_mode,
        init_image=init,
        strength=strength,
        mask=mask_img,
        mask_blur=mask_blur,
        loras=adapters.loras,
        embeddings=adapters.embeddings,
        refiner_switch=refiner_switch if refiner is not None else None,
        refiner_loras=refiner_loras,
        controls=controls,
    )
    try:
        base.validate(DeviceBudget.for_models(pipe.models))
        pipe.fast_steps(base)  # a cache branch deeper than the model's U-Net
        # LoRA and embedding files are read and checked against the model before the first step is rendered.
        pipe.use_loras(base.loras)
        if pipe.refiner is not None:
            pipe.refiner.use_loras(base.refiner_loras)
    except RequestError as exc:
        raise _bad(exc) from None
    except AdapterError as exc:
        raise fail(exc, 2) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    requests = with_seeds(base, n)
    with Progress(
        TextColumn("[bold]rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("render", total=None)

        def on_step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            results = pipe.generate(requests, progress=on_step)
        except AdapterError as exc:  # an embedding that does not fit the model: nothing was rendered
            raise fail(exc, 2) from None

    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    written: list[Path] = []
    for result in results:
        r = result.request
        infotext = format_infotext(r.prompt, r.negative_prompt, result.parameters)
        xmp = xmp_packet({"Model": pipe.models.checkpoint.name, "ModelSHA256": pipe.models.checkpoint.sha256})
        path = out / f"{index:05d}-{r.seed}.png"
        write_atomic(path, encode_png(_marked(result.image, infotext, watermark), infotext, xmp))
        written.append(path)
        index += 1
    for path in written:
        typer.echo(str(path))
    console.print(f"[green]wrote {len(written)} image(s) to {out}/[/green]")


def _refiner_lora(library, text: str):
    """``NAME`` or ``NAME:WEIGHT`` (both strengths) -> the LoRA's use; BadParameter names the option."""
    from engine.adapters.refs import LoraUse

    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        strength = float(weight) if weight else 1.0
    except ValueError:
        raise typer.BadParameter(f"{text!r}: the weight after ':' must be a number", param_hint="--refiner-lora") from None
    return LoraUse(library.lora(name.strip()), strength, strength)
