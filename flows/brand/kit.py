"""A brand kit: ``templates/brands/<brand>.yaml`` with the files it names beside it, or a folder
``templates/brands/<brand>/brand.yaml`` holding them.

::

    name: Acme Drinks                      # shown in the gallery
    min_contrast: 4.5                      # WCAG ratio every text keeps against what is behind it (default 4.5)
    palette: {green: "#0B6E4F", ink: "#141414", white: "#FFFFFF"}
    logo:                                  # SVG or PNG with transparency; at least one of the two
      light: acme/logo-light.svg           # the light logo, for dark pictures
      dark: acme/logo-dark.svg             # the dark logo, for light pictures
      plate: white                         # behind a logo that stands out less than min_contrast (default 3)
    fonts: {bold: acme/DejaVuSans-Bold.ttf, regular: acme/DejaVuSans.ttf}   # TTF / OTF files
    styles:
      headline: {font: bold, size: [28, 110], colour: white, alternate: ink, scrim: ink}
      body: {font: regular, size: [18, 44], colour: white, alternate: ink, scrim: ink}
      cta: {font: bold, size: [18, 40], colour: white, background: green}
    copy:                                  # what a row gets where its headline / body / cta cells are empty
      headline: "{{ tagline }}"            # Jinja over the row's columns
      cta: Shop now
    layouts:                               # "default", and one per channel name that needs its own
      default:
        safe: 0.05                         # margin: a share of the short side, or [left, top, right, bottom] px
        logo: {corner: top_left, width: 0.25}   # or [top_left, top_right]: the next where a product is
        headline: {box: [0, 0.12, 1, 0.2]} # x, y, width, height as shares of the safe zone
        cta: {box: [0, 0.88, 0.45, 0.12], size: [16, 30]}

Paths are relative to the kit file. A kit's ``sha256`` covers the YAML and every file it names, so a variant
planned with one logo never renders with another. Every problem raises :class:`~flows.brand.yaml_marks.YamlProblem`
naming the file, line and column.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFont

from flows.brand import drawables
from flows.brand.contrast import RGB, contrast_ratio
from flows.brand.yaml_marks import Located, YamlProblem, load_located

__all__ = ["BrandKit", "ElementBox", "KitError", "Layout", "LogoSpot", "TextStyle", "brands_dir", "kit_names", "load_kit",
           "ELEMENTS", "TEXT_ELEMENTS", "CORNERS"]

KitError = YamlProblem
TEXT_ELEMENTS = ("headline", "body", "cta")
ELEMENTS = ("logo", *TEXT_ELEMENTS)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right", "top_centre", "bottom_centre")
ALIGNS = ("start", "centre", "end")
MAX_KIT_BYTES = 256 * 1024
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_LOGO_PIXELS = 16_000_000
_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]{0,63}")
_HEX = re.compile(r"#([0-9a-fA-F]{6})")


@dataclass(frozen=True)
class TextStyle:
    font: Path
    size: tuple[int, int]  # smallest and largest font size in px
    colour: RGB
    alternate: RGB | None = None  # the other colour, tried when ``colour`` lacks contrast against the picture
    scrim: RGB | None = None  # a panel behind the text, added when neither colour has contrast enough
    line_height: float = 1.15  # line pitch as a multiple of the font size
    max_lines: int = 3
    align: str = "start"  # start | centre | end (start is the left for left-to-right text, the right for Hebrew)
    background: RGB | None = None  # a button behind the text (the call to action)
    padding: float = 0.5  # the button's / scrim's padding as a share of the font size


@dataclass(frozen=True)
class ElementBox:
    box: tuple[float, float, float, float]  # x, y, w, h as shares of the safe zone
    size: tuple[int, int] | None = None  # overrides the style's size range in this layout
    align: str | None = None


@dataclass(frozen=True)
class LogoSpot:
    corners: tuple[str, ...]  # in order of preference: the next is used where the row's product takes the one before
    width: float  # share of the safe zone's width
    max_height: float = 0.2  # share of the safe zone's height


@dataclass(frozen=True)
class Layout:
    name: str
    safe: tuple[float, float, float, float]  # left, top, right, bottom margins: < 1 share of the side, else px
    logo: LogoSpot | None = None
    texts: dict[str, ElementBox] = field(default_factory=dict)

    def safe_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the safe zone on a canvas of ``size``."""
        w, h = size
        short = min(w, h)
        l, t, r, b = (round(m * short) if m < 1 else round(m) for m in self.safe)
        return l, t, max(1, w - l - r), max(1, h - t - b)


@dataclass(frozen=True)
class BrandKit:
    key: str  # the name a brief writes (the file's stem)
    name: str
    path: Path
    sha256: str
    min_contrast: float
    logos: dict[str, Path]  # "light" / "dark" -> file
    styles: dict[str, TextStyle]
    copy: dict[str, Located]  # element -> Jinja text (with where it is written)
    layouts: dict[str, Layout]
    files: tuple[Path, ...] = ()  # every file the kit names, and their (size, mtime) when it was read
    stamps: tuple = ()
    # A logo is a graphic: WCAG 2.1 (1.4.11) asks 3:1 of it against its surroundings. Below that, a plate in this
    # colour goes behind it, at the lowest opacity that reaches it; None: the logo is drawn as it is (and the
    # record says its contrast).
    logo_plate: RGB | None = None
    logo_contrast: float = 3.0

    def layout_for(self, channel: str) -> Layout:
        return self.layouts.get(channel) or self.layouts["default"]

    def font(self, element: str, size: int) -> ImageFont.FreeTypeFont:
        return drawables.font(str(self.styles[element].font), size, self.sha256)

    def logo(self, variant: str, width: int, height: int) -> Image.Image:
        """The ``variant`` logo rendered or resized to fit ``width`` x ``height`` (aspect kept), RGBA."""
        return drawables.logo(str(self.logos[variant]), width, height, self.sha256)

    def logo_size(self, variant: str) -> tuple[int, int]:
        return drawables.logo_size(str(self.logos[variant]), self.sha256)


def brands_dir(templates_dir: str | os.PathLike[str] | None) -> Path:
    from flows.template_config import TEMPLATES_DIR

    return (Path(templates_dir) if templates_dir else TEMPLATES_DIR) / "brands"


def kit_names(templates_dir: str | os.PathLike[str] | None = None) -> list[str]:
    folder = brands_dir(templates_dir)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.glob("*.yaml")} | {p.parent.name for p in folder.glob("*/brand.yaml")})


# ------------------------------------------------------------------------------------------------ loading

_CACHE: dict[tuple[str, int, int], "BrandKit"] = {}
_LOCK = threading.Lock()


def load_kit(name: str, templates_dir: str | os.PathLike[str] | None = None) -> BrandKit:
    """The kit a brief names (``acme`` -> ``templates/brands/acme.yaml``), checked. Cached per process by the
    file's size and modification time; the files it names are hashed on every load that is not cached."""
    key = name.strip().lower()
    folder = brands_dir(templates_dir)
    if not _NAME.fullmatch(key):
        raise KitError(os.fspath(folder), None, None, f"brand {name!r}: a brand name is lower-case letters, digits, '-' and '_'")
    path = folder / f"{key}.yaml"
    if not path.exists() and (folder / key / "brand.yaml").exists():  # a kit as a folder: brands/<brand>/brand.yaml
        path = folder / key / "brand.yaml"
    try:
        stat = path.stat()
    except OSError:
        known = ", ".join(kit_names(templates_dir)) or "none"
        raise KitError(os.fspath(path), None, None, f"unknown brand {name!r} (brand kits in {folder}: {known})") from None
    cache_key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        cached = _CACHE.get(cache_key)
    # A logo or font replaced under the same name makes another kit (another sha256), though the YAML is the same.
    if cached is not None and _stamps(cached.files) == cached.stamps:
        return cached
    kit = _read_kit(key, path)
    with _LOCK:
        _CACHE[cache_key] = kit
    return kit


def _stamps(files: tuple[Path, ...]) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _read_kit(key: str, path: Path) -> BrandKit:
    file = os.fspath(path)
    if path.stat().st_size > MAX_KIT_BYTES:
        raise KitError(file, None, None, f"a brand kit file is at most {MAX_KIT_BYTES // 1024} KiB")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KitError(file, None, None, f"not UTF-8 text (byte {exc.start})") from None
    root = load_located(text, file)
    top = _mapping(root, required={"logo", "fonts", "styles", "layouts"},
                   optional={"name", "min_contrast", "palette", "copy"})
    hasher = hashlib.sha256(b"adforge-brand-kit-1\0" + data)
    palette = _palette(top.get("palette"))
    fonts = _files(top["fonts"], path.parent, hasher, kind="font")
    logo_node = _mapping(top["logo"], optional={"light", "dark", "plate", "min_contrast"})
    plate = _colour(logo_node["plate"], palette) if "plate" in logo_node else None
    logo_contrast = _number(logo_node["min_contrast"], 1.0, 21.0) if "min_contrast" in logo_node else 3.0
    logo_files = Located({k: v for k, v in logo_node.items() if k in ("light", "dark")}, *_where(top["logo"]))
    logos = _files(logo_files, path.parent, hasher, kind="logo", keys=("light", "dark"))
    min_contrast = _number(top["min_contrast"], 1.0, 21.0) if "min_contrast" in top else 4.5
    styles = {name: _style(entry, fonts, palette, min_contrast) for name, entry in _entries(top["styles"], TEXT_ELEMENTS).items()}
    if "headline" not in styles:
        raise top["styles"].problem("a kit needs at least a headline style")
    copy: dict[str, Located] = {}
    if "copy" in top:
        for element, text_node in _entries(top["copy"], TEXT_ELEMENTS).items():
            if not isinstance(text_node.value, str):
                raise text_node.problem("expected text (a Jinja template over the row's columns)")
            _check_template(text_node)
            copy[element] = text_node
    layouts = {name: _layout(name, entry, styles, bool(logos)) for name, entry in _mapping_items(top["layouts"])}
    if "default" not in layouts:
        raise top["layouts"].problem("a kit needs a 'default' layout (used by every channel without its own)")
    name = top["name"].value if "name" in top else key
    if not isinstance(name, str) or not name.strip():
        raise top["name"].problem("expected the brand's name as text")
    files = tuple(dict.fromkeys([*fonts.values(), *logos.values()]))
    return BrandKit(key=key, name=name.strip(), path=path, sha256=hasher.hexdigest(), min_contrast=min_contrast,
                    logos=logos, styles=styles, copy=copy, layouts=layouts, files=files, stamps=_stamps(files),
                    logo_plate=plate, logo_contrast=logo_contrast)


# ------------------------------------------------------------------------------------------------ parts


def _where(node: Located) -> tuple[str, int, int, str]:
    return node.file, node.line, node.column, node.path


def _mapping(node: Located, *, required: set[str] = frozenset(), optional: set[str] = frozenset()) -> dict[str, Located]:  # type: ignore[assignment]
    if not isinstance(node.value, dict):
        raise node.problem("expected a mapping (key: value lines)")
    allowed = required | optional
    for k, v in node.value.items():
        if allowed and k not in allowed:
            raise v.problem(f"unknown key (expected {', '.join(sorted(allowed))})")
    missing = sorted(required - node.value.keys())
    if missing:
        raise node.problem(f"missing {', '.join(missing)}")
    return node.value


def _mapping_items(node: Located) -> list[tuple[str, Located]]:
    return list(_mapping(node).items())


def _entries(node: Located, names: tuple[str, ...]) -> dict[str, Located]:
    return _mapping(node, optional=set(names))


def _number(node: Located, low: float, high: float) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise node.problem(f"expected a number from {low:g} to {high:g}")
    return float(value)


def _int_range(node: Located) -> tuple[int, int]:
    v = node.value
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x.value, int) and not isinstance(x.value, bool) for x in v)):
        raise node.problem("expected [smallest, largest] font sizes in px, whole numbers")
    low, high = v[0].value, v[1].value
    if not (4 <= low <= high <= 1000):
        raise node.problem("expected 4 <= smallest <= largest <= 1000 px")
    return low, high


def _palette(node: Located | None) -> dict[str, RGB]:
    if node is None:
        return {}
    out: dict[str, RGB] = {}
    for name, value in _mapping_items(node):
        out[name] = _hex(value)
    return out


def _hex(node: Located) -> RGB:
    m = _HEX.fullmatch(str(node.value)) if isinstance(node.value, str) else None
    if not m:
        raise node.problem("expected a colour as #RRGGBB")
    h = m.group(1)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _colour(node: Located, palette: dict[str, RGB]) -> RGB:
    if isinstance(node.value, str) and node.value in palette:
        return palette[node.value]
    if isinstance(node.value, str) and not node.value.startswith("#"):
        raise node.problem(f"unknown colour {node.value!r} (palette: {', '.join(palette) or 'empty'}; or #RRGGBB)")
    return _hex(node)


def _files(node: Located, base: Path, hasher, *, kind: str, keys: tuple[str, ...] | None = None) -> dict[str, Path]:
    entries = _mapping(node, optional=set(keys) if keys else frozenset())  # type: ignore[arg-type]
    if not entries:
        raise node.problem(f"no {kind} file named")
    out: dict[str, Path] = {}
    root = base.resolve()
    for name, value in entries.items():
        if not isinstance(value.value, str) or not value.value.strip():
            raise value.problem(f"expected a {kind} file path, relative to the kit file")
        path = (base / value.value).resolve()
        if path != root and root not in path.parents:
            raise value.problem(f"{value.value!r} leads out of the kit's folder {base}")
        try:
            size = path.stat().st_size
        except OSError:
            raise value.problem(f"{kind} file {value.value!r} not found (looked for {path})") from None
        if size > MAX_FILE_BYTES:
            raise value.problem(f"{kind} file {value.value!r} is {size // 1024 // 1024} MiB, more than {MAX_FILE_BYTES // 1024 // 1024} MiB")
        content = path.read_bytes()
        if kind == "font":
            _check_font(value, path)
        else:
            _check_logo(value, path, content)
        hasher.update(f"\0{kind}:{name}:{value.value}\0".encode() + hashlib.sha256(content).digest())
        out[name] = path
    return out


def _check_font(node: Located, path: Path) -> None:
    try:
        ImageFont.truetype(str(path), 20)
    except OSError as exc:
        raise node.problem(f"font file {node.value!r} cannot be read as TrueType / OpenType: {exc}") from None


def _check_logo(node: Located, path: Path, content: bytes) -> None:
    try:
        if path.suffix.lower() == ".svg":
            aspect = drawables.svg_aspect(str(path))  # refuses a size beyond reason before anything is drawn
            image = drawables.render_svg(str(path), 64, max(1, round(64 / aspect)))
        else:
            with Image.open(path) as probe:
                if probe.width * probe.height > MAX_LOGO_PIXELS:
                    raise node.problem(f"logo {node.value!r} is {probe.width}x{probe.height}, more than {MAX_LOGO_PIXELS:,} pixels")
                if probe.format != "PNG":
                    raise node.problem(f"logo {node.value!r} is {probe.format}; give an SVG or a PNG with transparency")
                image = probe.convert("RGBA")
    except YamlProblem:
        raise
    except Exception as exc:  # Pillow / resvg say why in their own words
        raise node.problem(f"logo {node.value!r} cannot be read: {exc}") from None
    alpha = image.getchannel("A")
    lo, hi = alpha.getextrema()
    if hi == 0:
        raise node.problem(f"logo {node.value!r} is fully transparent")
    if lo == 255:
        raise node.problem(f"logo {node.value!r} has no transparent pixel: a logo is drawn over the picture, give it "
                           "a transparent background")


def _style(node: Located, fonts: dict[str, Path], palette: dict[str, RGB], min_contrast: float) -> TextStyle:
    e = _mapping(node, required={"font", "size", "colour"},
                 optional={"alternate", "scrim", "line_height", "max_lines", "align", "background", "padding"})
    font_name = e["font"].value
    if font_name not in fonts:
        raise e["font"].problem(f"unknown font {font_name!r} (fonts: {', '.join(fonts)})")
    colour = _colour(e["colour"], palette)
    alternate = _colour(e["alternate"], palette) if "alternate" in e else None
    scrim = _colour(e["scrim"], palette) if "scrim" in e else None
    background = _colour(e["background"], palette) if "background" in e else None
    for other, key in ((background, "background"), (scrim, "scrim")):
        if other is not None and contrast_ratio(colour, other) < min_contrast:
            raise e[key].problem(f"the text colour on it has contrast {contrast_ratio(colour, other):.2f}:1, under "
                                 f"the kit's {min_contrast:g}:1")
    align = e["align"].value if "align" in e else "start"
    if align not in ALIGNS:
        raise e["align"].problem(f"expected one of {', '.join(ALIGNS)}")
    max_lines = e["max_lines"].value if "max_lines" in e else 3
    if isinstance(max_lines, bool) or not isinstance(max_lines, int) or not 1 <= max_lines <= 12:
        raise e["max_lines"].problem("expected a whole number from 1 to 12")
    return TextStyle(font=fonts[font_name], size=_int_range(e["size"]), colour=colour, alternate=alternate, scrim=scrim,
                     line_height=_number(e["line_height"], 0.8, 3.0) if "line_height" in e else 1.15,
                     max_lines=max_lines, align=align, background=background,
                     padding=_number(e["padding"], 0.0, 3.0) if "padding" in e else 0.5)


def _layout(name: str, node: Located, styles: dict[str, TextStyle], has_logo: bool) -> Layout:
    e = _mapping(node, required={"safe"}, optional={"logo", *TEXT_ELEMENTS})
    safe_node = e["safe"]
    if isinstance(safe_node.value, (int, float)) and not isinstance(safe_node.value, bool):
        margins = (_number(safe_node, 0, 4000),) * 4
    elif isinstance(safe_node.value, list) and len(safe_node.value) == 4:
        margins = tuple(_number(v, 0, 4000) for v in safe_node.value)
    else:
        raise safe_node.problem("expected a margin (share of the short side, or px) or [left, top, right, bottom]")
    for m in margins:
        if 0.45 < m < 1:
            raise safe_node.problem("a margin given as a share of the side is at most 0.45")
    logo = None
    if "logo" in e:
        if not has_logo:
            raise e["logo"].problem("the kit names no logo file")
        le = _mapping(e["logo"], required={"corner", "width"}, optional={"max_height"})
        corner_node = le["corner"]
        corners = [c.value for c in corner_node.value] if isinstance(corner_node.value, list) else [corner_node.value]
        if not corners or any(c not in CORNERS for c in corners) or len(set(corners)) != len(corners):
            raise corner_node.problem(f"expected one of {', '.join(CORNERS)}, or a list of them in order of preference")
        logo = LogoSpot(tuple(corners), _number(le["width"], 0.01, 1.0),
                        _number(le["max_height"], 0.01, 1.0) if "max_height" in le else 0.2)
    texts: dict[str, ElementBox] = {}
    for element in TEXT_ELEMENTS:
        if element not in e:
            continue
        if element not in styles:
            raise e[element].problem(f"the kit has no '{element}' style")
        te = _mapping(e[element], required={"box"}, optional={"size", "align"})
        box_node = te["box"]
        if not (isinstance(box_node.value, list) and len(box_node.value) == 4):
            raise box_node.problem("expected [x, y, width, height] as shares of the safe zone")
        x, y, w, h = (_number(v, 0.0, 1.0) for v in box_node.value)
        if w <= 0 or h <= 0 or x + w > 1.0001 or y + h > 1.0001:
            raise box_node.problem("the box must have a size and lie inside the safe zone (x + width <= 1, y + height <= 1)")
        align = te["align"].value if "align" in te else None
        if align is not None and align not in ALIGNS:
            raise te["align"].problem(f"expected one of {', '.join(ALIGNS)}")
        texts[element] = ElementBox((x, y, w, h), _int_range(te["size"]) if "size" in te else None, align)
    if logo is not None:  # the logo's area in every corner it may take keeps clear of the texts' boxes
        for corner in logo.corners:
            lx = 0.0 if corner.endswith("left") else 1 - logo.width if corner.endswith("right") else (1 - logo.width) / 2
            ly = 0.0 if corner.startswith("top") else 1 - logo.max_height
            for element, spec in texts.items():
                x, y, w, h = spec.box
                if lx < x + w and x < lx + logo.width and ly < y + h and y < ly + logo.max_height:
                    raise e["logo"].problem(f"the logo's {corner} area overlaps the {element} box")
    return Layout(name, margins, logo, texts)  # type: ignore[arg-type]


def _check_template(node: Located) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(node.value)
    except jinja2.TemplateSyntaxError as exc:
        raise node.problem(f"template error: {exc.message}") from None
