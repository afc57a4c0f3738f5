"""What the invisible watermark survives, what it costs in picture quality, and how often it is found where it is
not: a markdown table, PSNR per picture set, a false-positive count, and the time per embed and read.

Picture sets, each marked with an adforge asset identifier (``storage.watermark.embed``):

* natural-ish: smooth random colour fields at several scales plus fine grain (flat and busy parts);
* gradients: smooth two-colour gradients at random angles (a sky, a studio backdrop: where a mark shows first);
* ``--pictures DIR``: your own files (e.g. the example campaign's assets rendered with ``watermark = "off"``).

Edits: metadata stripped (the pixels re-saved as PNG); JPEG quality 90 / 75 / 50 (Pillow, 4:2:0); resized to
75 % / 50 % (Lanczos, saved as JPEG 85) and read back at the original size (what ``adforge verify`` does for the
channel sizes) or at the new size; cropped by 10 % of each side (top-left corner, bottom-right corner, centred;
saved as JPEG 85) read by the searching decoder; and each channel's own delivery (templates/channels.yaml: the
picture at the channel's size, encoded by ``flows.delivery.encode_within_cap`` under its size cap).

"detected": the right adforge identifier with confidence >= threshold. Unrelated pictures (natural-ish, flat,
gradients, photo-like 1/f noise, partly flat ones, and ``--unmarked DIR``'s files) are read as they are and after
JPEG 75, by the plain and the searching decoder: any confident reading is a false positive. Run::

    .venv/bin/python bench/watermark_survival.py                       # 24 pictures per set, 768x768
    .venv/bin/python bench/watermark_survival.py --images 8 --size 512 --unmarked 100
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.dwtdct import foreign_marks  # noqa: E402
from storage.watermark import THRESHOLD, can_carry, embed, read, search  # noqa: E402
from storage.watermark_payload import adforge_payload  # noqa: E402

Attack = Callable[[Image.Image], Image.Image]
Reader = Callable[[Image.Image], object]


def natural_image(width: int, height: int, seed: int, grain: float = 4.0) -> Image.Image:
    """Smooth random colour fields at cell sizes 256 / 64 / 16 px plus per-pixel grain."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((height, width, 3))
    for cell, weight in ((256, 0.55), (64, 0.3), (16, 0.15)):
        small = rng.uniform(0, 255, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        big = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((width + cell, height + cell), Image.BICUBIC))
        acc += weight * big[:height, :width]
    acc += rng.normal(0, grain, acc.shape)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")


def gradient_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth two-colour gradient at a random angle, no grain (a sky, a studio backdrop)."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = ((t - t.min()) / max(np.ptp(t), 1.0))[..., None]
    return Image.fromarray(np.clip(np.rint(a * (1 - t) + b * t), 0, 255).astype(np.uint8), "RGB")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like 1/f noise in colour (the spectrum of natural photographs), scaled to a random contrast."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(width, height))
    chans = [np.fft.irfft2(falloff * np.exp(2j * np.pi * rng.random(falloff.shape)), s=(height, width))
             for _ in range(3)]
    field_ = np.stack(chans, axis=-1)
    field_ = (field_ - field_.mean()) / field_.std()
    return Image.fromarray(np.clip(128 + rng.uniform(15, 60) * field_, 0, 255).astype(np.uint8), "RGB")


def _jpeg(quality: int) -> Attack:
    def attack(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return attack


def _png_stripped(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # no pnginfo, no exif, no xmp
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _resize(share: float, back: bool) -> Attack:
    def attack(im: Image.Image) -> Image.Image:
        small = _jpeg(85)(im.resize((round(im.width * share), round(im.height * share)), Image.LANCZOS))
        return small.resize(im.size, Image.LANCZOS) if back else small
    return attack


def _crop(where: str) -> Attack:
    def attack(im: Image.Image) -> Image.Image:
        dx, dy = round(im.width * 0.1), round(im.height * 0.1)
        left, top = {"top-left": (dx, dy), "bottom-right": (0, 0), "centred": (dx // 2, dy // 2)}[where]
        return _jpeg(85)(im.crop((left, top, left + im.width - dx, top + im.height - dy)))
    return attack


# name: (edit, reader)
ATTACKS: dict[str, tuple[Attack, Reader]] = {
    "none (PNG)": (_png_stripped, read),
    "metadata stripped (pixels re-saved as PNG)": (_png_stripped, read),
    "JPEG quality 90": (_jpeg(90), read),
    "JPEG quality 75": (_jpeg(75), read),
    "JPEG quality 50": (_jpeg(50), read),
    "resize to 75 %, read back at the original size": (_resize(0.75, True), read),
    "resize to 50 %, read back at the original size": (_resize(0.5, True), read),
    "resize to 75 %, read at that size": (_resize(0.75, False), search),
    "resize to 50 %, read at that size": (_resize(0.5, False), search),
    "crop 10 % from the top-left corner, searched": (_crop("top-left"), search),
    "crop 10 % from the bottom-right corner, searched": (_crop("bottom-right"), search),
    "crop 10 % centred, searched": (_crop("centred"), search),
    "crop 10 % centred, not searched": (_crop("centred"), read),
}


@dataclass
class Cell:
    n: int = 0
    detected: int = 0
    bits: float = 0.0
    confidences: list[float] = field(default_factory=list)

    def add(self, reading, payload: bytes) -> None:
        self.n += 1
        if reading is None:
            return
        got, want = (np.unpackbits(np.frombuffer(p, np.uint8)) for p in (reading.payload, payload))
        self.bits += float(np.mean(got == want))
        self.confidences.append(reading.confidence)
        self.detected += int(reading.is_adforge and reading.payload == payload)

    def text(self) -> str:
        if not self.n:
            return "-"
        low = min(self.confidences) if self.confidences else 0.0
        return f"{self.detected}/{self.n} (bits {self.bits / self.n:.1%}, min conf. {low:.2f})"


@dataclass
class PictureSet:
    name: str
    pictures: list[Image.Image]
    psnr: list[float] = field(default_factory=list)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def picture_sets(images: int, size: int, seed: int = 0, pictures: Path | None = None) -> list[PictureSet]:
    sets = [PictureSet(f"natural-ish {size}x{size}", [natural_image(size, size, seed + i) for i in range(images)]),
            PictureSet(f"gradients {size}x{size}", [gradient_image(size, size, seed + 500 + i) for i in range(images)])]
    if pictures is not None:
        files = sorted(p for p in pictures.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        sets.append(PictureSet(f"{pictures.name} ({len(files)} files)", [Image.open(p).convert("RGB") for p in files]))
    return sets


def survival(sets: Sequence[PictureSet]) -> dict[str, list[Cell]]:
    """Per edit, one Cell per picture set; fills each set's PSNR."""
    table = {name: [Cell() for _ in sets] for name in ATTACKS}
    for k, ps in enumerate(sets):
        for i, picture in enumerate(ps.pictures):
            payload = adforge_payload(f"bench-{ps.name}-{i}")
            marked = embed(picture, payload)
            ps.psnr.append(psnr(picture, marked))
            for name, (attack, reader) in ATTACKS.items():
                table[name][k].add(reader(attack(marked)), payload)
    return table


def channel_rows(channels: dict, images: int, seed: int = 0) -> dict[str, tuple[Cell, str, list[float]]]:
    """Per channel: detection after the channel's own encoding, the qualities it needed, the PSNR of the mark."""
    from flows.delivery import encode_within_cap
    from storage.image_metadata import xmp_packet

    out = {}
    for name, ch in channels.items():
        label = f"channel {name} ({ch.width}x{ch.height} {ch.format}, cap {ch.max_kb} KiB)"
        cell, psnrs, qualities = Cell(), [], set()
        if not can_carry(ch.width, ch.height):
            out[label] = (cell, "too small: not marked", psnrs)
            continue
        for i in range(images):
            # without grain: the small PNG channels' caps (150 KiB) fit designed banners, not film grain
            picture = natural_image(ch.width, ch.height, seed + 1000 + i, grain=0.0)
            payload = adforge_payload(f"bench-{name}-{i}")
            marked = embed(picture, payload)
            psnrs.append(psnr(picture, marked))
            qs: list[int | None] = []
            data, _ = encode_within_cap(marked, ch.format, lambda q: qs.append(q) or "adforge bench", xmp_packet(),
                                        ch.max_kb)
            qualities.add(qs[-1])
            cell.add(read(Image.open(io.BytesIO(data)).convert("RGB")), payload)
        used = sorted(q for q in qualities if q)
        note = "lossless" if not used else "quality " + "/".join(map(str, used))
        out[label] = (cell, note, psnrs)
    return out


@dataclass
class FalsePositives:
    pictures: int = 0
    readings: int = 0
    confident: int = 0  # any payload read with confidence >= THRESHOLD
    adforge: int = 0  # an adforge identifier (magic byte and confidence)
    foreign: int = 0  # a Stable Diffusion / SDXL mark "found"
    top_read: float = 0.0
    top_search: float = 0.0


def unrelated_pictures(count: int = 200, size: int = 512, seed: int = 10_000,
                       extra: Path | None = None) -> list[Image.Image]:
    """``count`` natural-ish pictures, ``count // 5`` each of gradients and 1/f noise, flat colours, a quarter of the
    natural-ish ones with a flat backdrop over 1/4 to 3/4 of them, and ``extra``'s files."""
    pictures = [natural_image(size, size, seed + i) for i in range(count)]
    pictures += [gradient_image(size, size - 32 * (i % 4), seed + 3000 + i) for i in range(count // 5)]
    pictures += [noise_image(size, size, seed + 4000 + i) for i in range(count // 5)]
    pictures += [Image.new("RGB", (size, size), c) for c in ((128, 128, 128), (0, 0, 0), (255, 255, 255),
                                                                 (200, 30, 60), (240, 240, 236))]
    for k, picture in enumerate(pictures[:count // 4]):  # a flat backdrop over part of the picture, as in packshots
        flat = picture.copy()
        flat.paste((240, 240, 236), (0, 0, size, size * (k % 3 + 1) // 4))
        pictures.append(flat)
    if extra is not None:
        pictures += [Image.open(p).convert("RGB") for p in sorted(extra.rglob("*"))
                     if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    return pictures


def false_positives(pictures: Sequence[Image.Image]) -> FalsePositives:
    """Each picture read as it is and after JPEG 75, by the plain and the searching decoder, and for foreign marks."""
    fp = FalsePositives(pictures=len(pictures))
    for picture in pictures:
        for candidate in (picture, _jpeg(75)(picture)):
            for reader in (read, search):
                reading = reader(candidate)
                if reading is None:
                    continue
                fp.readings += 1
                fp.confident += int(reading.confident)
                fp.adforge += int(reading.is_adforge)
                if reader is read:
                    fp.top_read = max(fp.top_read, reading.confidence)
                else:
                    fp.top_search = max(fp.top_search, reading.confidence)
            fp.foreign += len(foreign_marks(candidate))
    return fp


def timings(repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per embed, read and search of a 1080x1080 picture."""
    picture = natural_image(1080, 1080, 7)
    marked = embed(picture, adforge_payload("t"))
    out = {}
    for name, fn in (("embed", lambda: embed(picture, adforge_payload("t"))), ("read", lambda: read(marked)),
                     ("search", lambda: search(marked))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = 1000 * float(np.median(times))
    return out


def markdown(sets: Sequence[PictureSet], table: dict[str, list[Cell]],
             channels: dict[str, tuple[Cell, str, list[float]]] | None = None) -> str:
    head = ["edit"] + [s.name for s in sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| PSNR of the mark (mean / lowest) | " + " | ".join(
        f"{np.mean(s.psnr):.1f} / {min(s.psnr):.1f} dB" if s.psnr else "-" for s in sets) + " |")
    lines += [f"| {name} | " + " | ".join(c.text() for c in cells) + " |" for name, cells in table.items()]
    if channels:
        lines += ["", "| channel's own delivery | detected | PSNR of the mark | note |", "|---|---|---|---|"]
        for label, (cell, note, psnrs) in channels.items():
            p = f"{np.mean(psnrs):.1f} dB" if psnrs else "-"
            lines.append(f"| {label} | {cell.text()} | {p} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--unmarked", type=int, default=200, help="natural-ish unrelated pictures (more kinds follow)")
    parser.add_argument("--pictures", type=Path, help="a folder of pictures to mark as one more set")
    parser.add_argument("--unmarked-dir", type=Path, help="a folder of unmarked pictures for the false-positive count")
    args = parser.parse_args()
    from flows.channels import load_channels

    sets = picture_sets(args.images, args.size, pictures=args.pictures)
    print(markdown(sets, survival(sets), channel_rows(load_channels(), args.images)))
    fp = false_positives(unrelated_pictures(args.unmarked, extra=args.unmarked_dir))
    print(f"\nunrelated pictures: {fp.pictures}, {fp.readings} readings (as they are and after JPEG 75, plain and "
          f"searching decoder): {fp.confident} confident (threshold {THRESHOLD}), {fp.adforge} adforge identifiers, "
          f"{fp.foreign} foreign marks; highest confidence {fp.top_read:.3f} plain, {fp.top_search:.3f} searched")
    t = timings()
    print(f"1080x1080: embed {t['embed']:.0f} ms, read {t['read']:.0f} ms, search {t['search']:.0f} ms (median of 5)")


if __name__ == "__main__":
    main()
