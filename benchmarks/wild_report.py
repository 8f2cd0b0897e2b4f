"""Photo mode on wild/ photos: the per-image report and a contact sheet of the faces it processed.

Runs `fsr upscale --mode photo` (the library call) on the wild/ photos, writes the JSON
report, prints every detection, and draws each one photo mode acted on (super-resolved, or
rejected as not a face) as a tile: the classical upscale beside the result, labelled with
the route, size, score, drift and reason.

    python benchmarks/wild_report.py --limit 20 --out /tmp/wild
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fsr.core.device import Compute
from fsr.core.io import read_image
from fsr.detect.crop import extract_square, square_box
from fsr.upscale import UpscaleOptions, classical_upscale, upscale_path, write_upscale_report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TILE = 160


def face_tile(original: np.ndarray, output: np.ndarray, face: dict, scale: int, name: str) -> Image.Image:
    """Classical | result of one detection's square, with a caption."""
    x0, y0, side = square_box(face["box"])
    classical = extract_square(classical_upscale(extract_square(original, x0, y0, side), scale), 0, 0, side * scale)
    result = extract_square(output, x0 * scale, y0 * scale, side * scale)
    pair = [Image.fromarray(np.ascontiguousarray(a)).resize((TILE, TILE), Image.BICUBIC) for a in (classical, result)]
    tile = Image.new("RGB", (2 * TILE, TILE + 28), "white")
    tile.paste(pair[0], (0, 0))
    tile.paste(pair[1], (TILE, 0))
    drift = "" if face["drift"] is None else f" drift {face['drift']:.2f}"
    caption = f"{name} {face['route']} {face['side']:.0f}px s{face.get('score', 1):.2f}{drift}"
    draw = ImageDraw.Draw(tile)
    draw.text((3, TILE + 2), caption[:52], fill="black")
    draw.text((3, TILE + 14), (face["reason"] or "")[:52], fill="red")
    return tile


def draw_sheet(report: Path, scale: int, out: Path, columns: int = 4) -> None:
    """Contact sheet of the detections photo mode acted on (super-resolved or rejected)."""
    tiles = []
    for image in json.loads(report.read_text())["images"]:
        faces = [f for f in image["faces"] if f["route"] != "classical"]
        if image["status"] != "done" or not faces:
            continue
        original, output = read_image(image["input"]).rgb, read_image(image["output"]).rgb
        tiles += [face_tile(original, output, f, scale, Path(image["input"]).stem) for f in faces]
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * 2 * TILE, max(1, rows) * (TILE + 28)), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * 2 * TILE, (k // columns) * (TILE + 28)))
    sheet.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wild", type=Path, default=DATA / "wild")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fsr_wild"))
    args = parser.parse_args()
    src = args.out / "in"
    src.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.wild.glob("*.jpg"))[: args.limit]:
        if not (src / path.name).exists():
            (src / path.name).symlink_to(path.resolve())
    options = UpscaleOptions(mode="photo", scale=args.scale, show_progress=False, overwrite=True)
    summary = upscale_path(src, args.out / "out", options, Compute.create("cpu", "fp32", batch_size=8))
    write_upscale_report(args.out / "report.json", summary)
    draw_sheet(args.out / "report.json", args.scale, args.out / "contact_sheet.png")
    routes = [f["route"] for r in summary.results for f in r.faces]
    print(f"{summary.done} photos, detections {len(routes)}: sr {routes.count('sr')}, classical "
          f"{routes.count('classical')}, rejected {routes.count('rejected')}")
    for result in summary.results:
        for f in result.faces:
            print(f"{Path(result.input).name:24s} {f['route']:9s} side {f['side']:6.1f} score {f.get('score', 1):.3f} "
                  f"drift {f['drift']} {f['reason']}")
    print(f"report {args.out / 'report.json'}, sheet {args.out / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
