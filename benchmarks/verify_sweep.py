"""Wall time of the LFW verification sweep (``fsr verify-sweep``): 6,000 pairs, 10 alphas,
bicubic + the default model + HR. Target: under 2 minutes on one H100/H200.

    python benchmarks/verify_sweep.py --data scratch/lfw                      # full run
    python benchmarks/verify_sweep.py --data scratch/lfw --device cpu --folds 2 --limit 20 --alphas 0.5,1

Without the default model's weights (``weights/fsr_default.safetensors``), ``--untrained-default``
times an untrained ESRGAN-size RRDB (nf 64, nb 23, gc 32) in its place: the same arithmetic,
meaningless accuracy (labelled ``rrdb-untrained``). Embeddings are not cached (every face is
recomputed). Prints the machine, the device, the wall time split into loading and
embedding+scoring, faces per second, and the accuracy table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from compute_args import add_compute_arguments

REPO = Path(__file__).resolve().parents[1]


def untrained_rrdb_export(folder: Path) -> Path:
    """Write an untrained RRDB x4 export (.safetensors + .json card) for timing only."""
    import torch

    from fsr.core.weights import save_safetensors
    from fsr.models.rrdb import RRDBNet

    torch.manual_seed(0)
    args = {"nf": 64, "nb": 23, "gc": 32}
    model = RRDBNet(**args)
    path = folder / "rrdb-untrained.safetensors"
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path, {"note": "untrained, timing only"})
    path.with_suffix(".json").write_text(json.dumps({"architecture": "rrdb", "arch_args": args, "scale": 4}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "scratch" / "lfw"), help="prepared LFW set (fsr prepare output)")
    parser.add_argument("--pairs", default=str(REPO.parent / "shared" / "data" / "lfw" / "pairs.txt"), help="LFW pairs.txt")
    parser.add_argument("--systems", default="bicubic,default", help="comma-separated SR systems")
    parser.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="comma-separated alphas")
    parser.add_argument("--model", default="dlib", help="face model")
    parser.add_argument("--weights", default=None, help="face model weights (sphereface / lightcnn)")
    add_compute_arguments(parser, batch_size=512, batch_help="faces per device batch")
    parser.add_argument("--folds", type=int, default=0, help="first N folds only (0 = all)")
    parser.add_argument("--limit", type=int, default=0, help="at most N pairs per fold (0 = all)")
    parser.add_argument("--untrained-default", action="store_true", help="time an untrained RRDB when the default model is missing")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    from rich.console import Console

    from fsr.core.device import Compute, machine_description
    from fsr.core.weights import find_weights
    from fsr.evaluate.sweep import alpha_table, run_sweep, sweep_table
    from fsr.models.systems import DEFAULT_MODEL_NAME

    console = Console()
    compute = Compute.create(args.device, args.precision, args.batch_size, threads=args.threads or None)
    systems = [s for s in args.systems.split(",") if s]
    alphas = [float(a) for a in args.alphas.split(",") if a]
    with tempfile.TemporaryDirectory() as tmp:
        if "default" in systems and find_weights(f"{DEFAULT_MODEL_NAME}.safetensors") is None:
            if not args.untrained_default:
                sys.exit("error: default model weights not found; pass --untrained-default to time an untrained RRDB")
            systems[systems.index("default")] = str(untrained_rrdb_export(Path(tmp)))
        start = time.perf_counter()
        result = run_sweep(
            args.data, args.pairs, systems, compute, alphas=alphas, face_model=args.model, face_weights=args.weights,
            folds=args.folds or None, limit=args.limit or None, cache_dir=None,
        )
        wall = time.perf_counter() - start
    console.print(alpha_table(result))
    console.print(sweep_table(result))
    figures = {
        "machine": machine_description(),
        "device": compute.describe(),
        "pairs": result.n_pairs,
        "faces": result.n_images,
        "alphas": len(result.alphas),
        "systems": result.systems,
        "wall_s": round(wall, 2),
        "load_faces_s": round(result.timings["load_faces_s"], 2),
        "embed_and_score_s": round(result.timings["embed_and_score_s"], 2),
        "faces_embedded": result.timings["faces_embedded"],
        "faces_per_s": round(result.timings["faces_per_s"], 1),
        "hr_accuracy": result.hr.accuracy_mean if result.hr else None,
        "accuracy_at_alpha_1": {s: result.results[s][1.0].accuracy_mean for s in result.systems if 1.0 in result.results[s]},
    }
    console.print(f"machine: {figures['machine']}")
    console.print(f"device: {figures['device']}")
    console.print(
        f"verify-sweep: {result.n_pairs} pairs, {result.n_images} faces, {len(result.alphas)} alphas, systems {result.systems} + HR: "
        f"[bold]{wall:.1f} s[/] wall (load {figures['load_faces_s']} s, embed+score {figures['embed_and_score_s']} s, "
        f"{figures['faces_per_s']} faces/s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
