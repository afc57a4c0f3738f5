"""Upscaling: chains of steps that take a rendered image to a channel's exact delivered size.

* :mod:`engine.upscale.chain`     the chain syntax (``hires(scale=2, denoise=0.4) -> model(4x.pth) -> fit(1080x1920)``),
  parsed into dataclasses with a canonical text form;
* :mod:`engine.upscale.networks`  super-resolution model files (ESRGAN family and the rest of what spandrel knows),
  loaded once per process;
* :mod:`engine.upscale.hires`     the hires fix: render at native size, upscale, re-render with img2img;
* :mod:`engine.upscale.runner`    applies a parsed chain to rendered images and names what it did in infotext terms.

Tiles (big outputs in bounded memory) are :mod:`engine.tiling`'s, shared with the pipeline.

Nothing here imports the flows, storage, Prefect or SQLAlchemy (see DESIGN.md). Submodules are imported
directly (``from engine.upscale.chain import parse_chain``).
"""
