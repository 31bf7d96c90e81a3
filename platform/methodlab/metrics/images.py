"""A grid of images as a diagnostic chart: inputs next to what a method makes of them (TOAST's
top-down token mask, canonicalization's canonical poses). Built on rank 0 from a few rows the
method kept on the CPU at its last evaluation, so it costs the training loop nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class ImageRow:
    """One row of the grid.

    images (N, C, H, W): shown in gray (C = 1, or the first channel of C != 3) or RGB (C = 3),
    each panel stretched to its own min..max (the data may be standardized). With `value_range`
    the row is a map instead (e.g. a mask in [0, 1]): its first channel in a colour scale fixed
    to that range, so its panels compare with each other.
    """

    label: str
    images: torch.Tensor
    value_range: tuple[float, float] | None = None


def _panel(image: torch.Tensor, as_map: bool):
    """(C, H, W) -> what imshow takes: (H, W) or (H, W, 3) in [0, 1] for an image, (H, W) for a map."""
    if as_map or image.shape[0] != 3:
        image = image[0]
    if as_map:
        return image.numpy()
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
    return (image.permute(1, 2, 0) if image.dim() == 3 else image).numpy()


def image_grid_chart(rows: Sequence[ImageRow], title: str, columns: Sequence[str] = ()):
    """A matplotlib Figure: one row per ImageRow (its label on the left), one column per image,
    `columns` as the titles of the top row's panels. Rows may hold different image sizes (a
    patch-level mask under its images): each panel fills its cell."""
    from matplotlib.figure import Figure

    n = max(len(r.images) for r in rows)
    fig = Figure(figsize=(1.1 * n + 1.8, 1.15 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for i, row in enumerate(rows):
        images = row.images.detach().float().cpu()
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.set_axis_off()
                continue
            if row.value_range is not None:
                shown = ax.imshow(_panel(images[j], True), cmap="viridis", vmin=row.value_range[0],
                                  vmax=row.value_range[1], interpolation="nearest")
                if j == len(images) - 1:     # one colour scale per map row
                    fig.colorbar(shown, ax=list(axes[i]), shrink=0.9, pad=0.01)
            else:
                ax.imshow(_panel(images[j], False), cmap="gray", interpolation="nearest")
            if i == 0 and j < len(columns):
                ax.set_title(columns[j], fontsize=7)
        axes[i][0].set_ylabel(row.label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    return fig
