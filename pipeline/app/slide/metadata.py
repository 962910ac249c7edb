"""What ``ats-wsi info`` reports: each slide's levels, sizes, mpp and backend, and why
an input could not be read. No torch here, so ``info`` starts fast."""

from __future__ import annotations

import os
from collections.abc import Iterable

from pipeline.app.slide.inputs import list_inputs


def slide_info(path: str | os.PathLike) -> dict:
    """Metadata of a slide as plain JSON-able values."""
    import readers

    with readers.open_slide(path) as slide:
        return {
            "path": str(path),
            "backend": slide.backend,
            "shape": list(slide.shape),
            "mpp": list(slide.mpp) if slide.mpp is not None else None,
            "levels": [
                {
                    "index": i,
                    "shape": list(level.shape),
                    "downsample": float(level.downsample),
                    "tile_shape": list(level.tile_shape),
                }
                for i, level in enumerate(slide.levels)
            ],
        }


def describe(
    items: Iterable[str | os.PathLike],
    errors: tuple[type[BaseException], ...],
    recursive: bool = False,
) -> list[dict]:
    """``slide_info`` of every slide of ``items`` (files and directories, listed as
    ``inputs.list_inputs`` does), in order; an input that cannot be read, or whose
    ``slide_info`` raises one of ``errors``, gives ``{"path": ..., "error": ...}``."""
    infos = []
    for item in list_inputs(items, recursive=recursive):
        if item.error:
            infos.append({"path": str(item.path), "error": item.error})
            continue
        try:
            infos.append(slide_info(item.path))
        except errors as e:
            infos.append({"path": str(item.path), "error": f"{type(e).__name__}: {e}"})
    return infos
