"""The comparison grid of ``fsr metrics --grid N``: the same faces through every system.

One row per face; columns LR (shown with nearest-neighbour enlargement, as the network sees
it), each system's output and the HR target, with PSNR (RGB, dB) and, when a face model was
used, the identity measure under each output tile. Written as one PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsr.core.io import atomic_path


@dataclass
class GridRow:
    """One face: its key, HR (3, H, W) and optional LR (3, h, w) in [0, 1], each system's
    output (3, H, W) in [0, 1] and its metrics row (``psnr_rgb``, ``id_distance``...)."""

    key: str
    hr: torch.Tensor
    outputs: dict[str, torch.Tensor]
    stats: dict[str, dict[str, float]]
    lr: torch.Tensor | None = None


def grid_positions(total: int, count: int) -> set[int]:
    """``count`` positions spread evenly over ``total`` images (first and last included)."""
    if count <= 0 or total <= 0:
        return set()
    return {int(round(v)) for v in np.linspace(0, total - 1, min(count, total))}


def _tile_label(stats: dict[str, float]) -> str:
    parts = [f"{stats['psnr_rgb']:.2f} dB"]
    if "id_distance" in stats:
        parts.append(f"d {stats['id_distance']:.3f}")
    elif "id_cosine" in stats:
        parts.append(f"cos {stats['id_cosine']:.3f}")
    return "  ".join(parts)


def save_comparison_grid(path: str | Path, rows: list[GridRow], systems: list[str], title: str = "") -> Path:
    """Write the grid PNG atomically and return its path (rows in the order given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_lr = all(r.lr is not None for r in rows)
    columns = (["LR"] if with_lr else []) + list(systems) + ["HR"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.9 * len(columns), 2.15 * len(rows) + 0.4),
                             squeeze=False)
    to_np = lambda t: t.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # noqa: E731
    for i, row in enumerate(rows):
        images = ([row.lr] if with_lr else []) + [row.outputs[s] for s in systems] + [row.hr]
        for j, (name, image) in enumerate(zip(columns, images)):
            ax = axes[i, j]
            ax.imshow(to_np(image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if name in row.stats:
                ax.set_xlabel(_tile_label(row.stats[name]), fontsize=7)
            if j == 0:  # the key's end: the file name tells faces apart
                ax.set_ylabel(row.key if len(row.key) <= 24 else "..." + row.key[-21:], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path
