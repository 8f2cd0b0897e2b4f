"""Faces/s of `fsr upscale --mode faces`: the SR model on 32x32 faces, and the whole pipeline.

Measures, for the default model (when weights/fsr_default.safetensors exists) and for the
ESRGAN-size RRDB (nf 64, gc 32, 23 blocks, random weights):

* ``system``: ``SRSystem.upscale`` on N LR faces, exactly the call `fsr upscale` makes
  (host -> device, autocast, channels_last on CUDA, batched with OOM back-off, result
  back on the host);
* ``forward``: the network alone on device-resident batches, with the optional speed-ups
  (``--bf16-weights``: weights and activations in bf16 instead of autocast; ``--compile
  MODE``: torch.compile; ``--cuda-graph``: the forward captured once and replayed);
* ``pipeline`` (``--end-to-end N``): `fsr upscale --mode faces` on N real 32x32 LFW crops
  written as PNG files (decode + SR + encode + atomic write).

    python benchmarks/upscale.py --device cpu --batch-size 8 --faces 32
    python benchmarks/upscale.py --device cuda --batch-size 512 --faces 20480 --bf16-weights --compile max-autotune --cuda-graph
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fsr.core.device import Compute, machine_description, precision_name, synchronize
from fsr.core.weights import find_weights
from fsr.models.rrdb import RRDBNet
from fsr.models.systems import DEFAULT_MODEL_NAME, SRSystem, load_sr_system
from compute_args import add_compute_arguments

REPO = Path(__file__).resolve().parents[1]



def time_system(system: SRSystem, faces: int, repeats: int) -> float:
    """Faces/s of ``system.upscale`` on ``faces`` random LR faces held on the host."""
    lr = torch.rand(faces, 3, 32, 32)
    # warm-up on the whole timed set: cudnn autotune and the allocator on a GPU; on a CPU the first
    # model of a process runs its first full pass 25-35% slower (oneDNN primitive creation), which
    # one batch did not absorb
    system.upscale(lr)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        system.upscale(lr)
        best = min(best, time.perf_counter() - t0)
    return faces / best


def time_forward(model: torch.nn.Module, compute: Compute, batch: int, batches: int, args) -> tuple[float, str]:
    """Faces/s of the bare network on device-resident batches, with the requested speed-ups."""
    device = compute.device
    model = model.to(device).eval()
    variant = [precision_name(compute.dtype)]
    use_autocast = compute.dtype != torch.float32
    dtype = torch.float32
    if args.bf16_weights and compute.dtype != torch.float32:
        model = model.to(compute.dtype)
        dtype, use_autocast = compute.dtype, False
        variant.append(f"{precision_name(dtype)} weights")
    memory_format = torch.contiguous_format
    if device.type == "cuda" or args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        memory_format = torch.channels_last
        variant.append("channels_last")
    fn = model
    if args.compile != "none":
        fn = torch.compile(model, mode=None if args.compile == "default" else args.compile)
        variant.append(f"compile {args.compile}")
    x = torch.rand(batch, 3, 32, 32, device=device).to(dtype).contiguous(memory_format=memory_format)

    def step(inp: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if use_autocast:
                with torch.autocast(device.type, dtype=compute.dtype):
                    return fn(inp)
            return fn(inp)

    t0 = time.perf_counter()
    for _ in range(3 if device.type == "cuda" else 1):
        step(x)
    synchronize(device)
    warmup = time.perf_counter() - t0
    run = lambda: step(x)  # noqa: E731
    if args.cuda_graph and device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x)
        run = graph.replay
        variant.append("cuda graph")
    run()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        run()
    synchronize(device)
    seconds = time.perf_counter() - t0
    return batch * batches / seconds, ", ".join(variant) + f" (warm-up {warmup:.1f} s)"


def time_pipeline(model_spec: str, compute: Compute, faces: int) -> float:
    """Faces/s of `fsr upscale --mode faces` on ``faces`` real 32x32 LFW crops (files in, files out)."""
    import numpy as np
    from PIL import Image

    from fsr.core.io import read_image, to_tensor, to_uint8
    from fsr.data.degrade import resize_bicubic
    from fsr.upscale import UpscaleOptions, upscale_path

    lfw = REPO.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"
    sources = sorted(lfw.glob("*/*.jpg"))[:faces]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i in range(faces):
            rgb = read_image(sources[i % len(sources)]).rgb[61:189, 61:189]
            lr = to_uint8(resize_bicubic(to_tensor(np.ascontiguousarray(rgb))[None], 32)[0].clamp(0, 1))
            Image.fromarray(lr).save(src / f"{i:06d}.png")
        options = UpscaleOptions(mode="faces", model=model_spec, out_format="png", show_progress=False)
        summary = upscale_path(src, Path(tmp) / "out", options, compute)
        assert summary.done == faces, summary.failed
        return faces / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compute_arguments(parser, batch_size=0, batch_help="faces per batch (0: 8 on the CPU, 512 on a GPU)")
    parser.add_argument("--faces", type=int, default=0, help="faces per timed run (0: 16 on the CPU, 40 batches on a GPU)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats of the system run, best kept (0: 3 on a GPU, 1 on the CPU)")
    parser.add_argument("--models", default="default,rrdb23", help="comma list: default, rrdb23, or a model spec/path")
    parser.add_argument("--bf16-weights", action="store_true", help="forward: cast the network to the compute dtype")
    parser.add_argument("--channels-last", action="store_true", help="forward: channels_last also on the CPU")
    parser.add_argument("--compile", default="none", help="forward: none | default | reduce-overhead | max-autotune")
    parser.add_argument("--cuda-graph", action="store_true", help="forward: capture one batch as a CUDA graph and replay it")
    parser.add_argument("--end-to-end", type=int, default=0, help="also time `fsr upscale --mode faces` on N real crops")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    probe = Compute.create(args.device, args.precision, 1, threads=args.threads or None)
    on_gpu = probe.device.type == "cuda"
    batch = args.batch_size or (512 if on_gpu else 8)
    faces = args.faces or (batch * 40 if on_gpu else 16)
    compute = Compute.create(args.device, args.precision, batch, threads=args.threads or None)
    print(machine_description())
    print(f"compute: {compute.describe()}, batch {batch}, {faces} faces per run")
    rows = []
    for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
        if spec == "default" and find_weights(f"{DEFAULT_MODEL_NAME}.safetensors") is None:
            print(f"default: weights/{DEFAULT_MODEL_NAME}.safetensors not present; skipped")
            continue
        if spec == "rrdb23":
            torch.manual_seed(0)
            system = SRSystem(name="rrdb23 (random)", model=RRDBNet(nf=64, nb=23, gc=32), compute=compute)
        else:
            system = load_sr_system(spec, compute)
        params = sum(p.numel() for p in system.model.parameters()) / 1e6
        rate = time_system(system, faces, args.repeats or (3 if on_gpu else 1))
        rows.append({"model": system.name, "params_M": round(params, 2), "measure": "system", "variant": compute.describe(),
                     "faces_per_s": round(rate, 1)})
        print(f"{system.name:18s} {params:6.2f}M  system   {rate:10.1f} faces/s  ({compute.describe()})")
        fwd_rate, variant = time_forward(system.model, compute, batch, max(1, faces // batch), args)
        rows.append({"model": system.name, "params_M": round(params, 2), "measure": "forward", "variant": variant,
                     "faces_per_s": round(fwd_rate, 1)})
        print(f"{system.name:18s} {params:6.2f}M  forward  {fwd_rate:10.1f} faces/s  ({variant})")
        if args.end_to_end and spec != "rrdb23":
            e2e = time_pipeline(spec, compute, args.end_to_end)
            rows.append({"model": system.name, "params_M": round(params, 2), "measure": "pipeline",
                         "variant": f"{args.end_to_end} PNG files", "faces_per_s": round(e2e, 1)})
            print(f"{system.name:18s} {params:6.2f}M  pipeline {e2e:10.1f} faces/s  ({args.end_to_end} PNG files in/out)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "batch": batch, "faces": faces, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
