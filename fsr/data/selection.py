"""Choose the source images a protocol needs, so a quick run prepares only those.

``fsr prepare --pairs pairs.txt`` keeps the images a verification protocol names (LFW
``pairs.txt``: ``Name/Name_000N.jpg``; a CSV ``a,b,...``: the two paths, relative to a
source folder); ``--limit N`` keeps the first N images in sorted order.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fsr.core.io import iter_image_files


class SelectionError(ValueError):
    """A pairs file that cannot be read, or a selection that names no image (one line)."""


def pair_image_keys(pairs_file: str | Path) -> set[str]:
    """Relative image paths (``Name/Name_0001.jpg``) named by an LFW pairs.txt or a CSV of pairs."""
    path = Path(pairs_file)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SelectionError(f"{path}: cannot read ({exc})") from None
    keys: set[str] = set()
    if path.suffix.lower() == ".csv" or "," in text.split("\n", 1)[0]:
        for row in csv.reader(text.splitlines()):
            if len(row) >= 2 and row[0].strip() not in ("a", "file_x"):
                keys.update(cell.strip() for cell in row[:2])
        return keys
    for parts in (line.split() for line in text.splitlines()[1:] if line.strip()):
        if len(parts) == 3:
            keys.update(f"{parts[0]}/{parts[0]}_{int(n):04d}.jpg" for n in parts[1:])
        elif len(parts) == 4:
            keys.update({f"{parts[0]}/{parts[0]}_{int(parts[1]):04d}.jpg", f"{parts[2]}/{parts[2]}_{int(parts[3]):04d}.jpg"})
        else:
            raise SelectionError(f"{path}: line '{' '.join(parts)}' is not an LFW pair")
    return keys


def select_images(sources: list[Path], pairs_file: str | Path | None = None, limit: int = 0) -> list[Path]:
    """The image files under ``sources`` a protocol needs (``pairs_file``), at most ``limit`` (0 = all).

    Sources that are files are kept as they are; folders are walked. Raises
    :class:`SelectionError` when nothing is left.
    """
    keys = pair_image_keys(pairs_file) if pairs_file is not None else None
    chosen: list[Path] = []
    for source in sources:
        files = [source] if source.is_file() else iter_image_files(source)
        for path in files:
            rel = path.name if source.is_file() else path.relative_to(source).as_posix()
            if keys is None or rel in keys or path.name in keys:
                chosen.append(path)
    chosen.sort()
    if limit:
        chosen = chosen[:limit]
    if not chosen:
        named = f"named in {pairs_file} " if pairs_file is not None else ""
        raise SelectionError(f"no image {named}found under {', '.join(map(str, sources))}")
    return chosen
