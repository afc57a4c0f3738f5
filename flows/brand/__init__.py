"""Brand kits: a brand's logo, fonts, palette, text styles and per-channel layouts (``templates/brands/``), and the
overlay that puts its logo, headline, body and call to action on every delivered asset of a row that names it.

* :mod:`flows.brand.kit` reads and checks a kit file (every problem names the file, line and column).
* :mod:`flows.brand.text` fits a text into a box (line breaks, size within the style's range, shaping).
* :mod:`flows.brand.contrast` measures WCAG contrast against the pixels behind a text.
* :mod:`flows.brand.layout` turns a kit's layout into pixel boxes for one canvas, around a placed product.
* :mod:`flows.brand.compose` draws the overlay and says what it drew where.
* :mod:`flows.brand.rows` is the planning side: a brief row's brand and copy, checked before anything renders.
"""
