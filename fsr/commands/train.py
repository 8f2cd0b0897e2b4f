"""`fsr train`: train IP-FSRGAN (or a baseline) on faces made by `fsr prepare`."""

from __future__ import annotations

import enum
import os
import shlex
import sys
from pathlib import Path

import typer

from fsr.commands.common import choice_enum, console, fail
from fsr.core.weights import WeightsError
from fsr.data.dataset import DatasetError, write_face_cache
from fsr.models.face import FaceModelName
from fsr.train.config import ConfigError, LossWeightsPreset, PerceptualNet, PresetName
from fsr.train.loop import TrainingError, resolve_run_config, run_training

Preset = choice_enum("Preset", PresetName)
LossWeightsChoice = choice_enum("LossWeightsChoice", LossWeightsPreset)
IdModel = choice_enum("IdModel", FaceModelName)
Perceptual = choice_enum("Perceptual", PerceptualNet)


def _value(choice: enum.Enum | None) -> str | None:
    return None if choice is None else choice.value


def train_command(
    data: list[Path] = typer.Argument(..., help="Prepared face folder(s) (from `fsr prepare`) or .npz face cache(s); several are joined."),
    run_dir: Path = typer.Option(Path("runs/fsr"), "--run-dir", help="Folder for config, checkpoints, logs, samples and exports."),
    config_file: Path = typer.Option(None, "--config", help="TOML, YAML or JSON config file (sections model, loss, optim, train, data, compute)."),
    preset: Preset = typer.Option(None, "--preset", help="Preset (default ipfsrgan, or the config file's)."),
    overrides: list[str] = typer.Option(None, "--set", help="Override one config value: section.key=value, e.g. --set optim.lr_g=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its newest complete checkpoint."),
    steps: int = typer.Option(None, "--steps", min=0, help="Total training steps (train.steps)."),
    batch_size: int = typer.Option(None, "--batch-size", min=2, help="Faces per batch per process (train.batch_size)."),
    weights_preset: LossWeightsChoice = typer.Option(None, "--loss-weights", help="Eq. 1 weights: paper (perceptual 0.01, L1 1) | public-code (perceptual 1, L1 0.01)."),
    id_margin: float = typer.Option(None, "--id-margin", help="Margin m of the identity loss (Eq. 5)."),
    old_margin: float = typer.Option(None, "--margin", hidden=True, help="Old name of --id-margin (removed in the next release)."),
    id_model: IdModel = typer.Option(None, "--id-model", help="Identity network F of Eq. 5 (dlib ships; lightcnn, sphereface need --id-weights)."),
    id_weights: Path = typer.Option(None, "--id-weights", help="Checkpoint for --id-model lightcnn/sphereface."),
    vgg_weights: Path = typer.Option(None, "--vgg-weights", help="torchvision VGG19 checkpoint (vgg19-dcbb9e9d.pth) for the perceptual loss."),
    perceptual: Perceptual = typer.Option(None, "--perceptual", help="Perceptual loss network: vgg (needs --vgg-weights), identity (identity-network features) or none."),
    export: str = typer.Option(None, "--export", help="Export the best validated G as NAME (run-dir/export/NAME.*) or PATH.safetensors."),
    force: bool = typer.Option(False, "--force", help="Export even a model below bicubic on validation."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (under torchrun: each process its LOCAL_RANK GPU)."),
    precision: str = typer.Option(None, "--precision", help="auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)."),
    threads: int = typer.Option(None, "--threads", min=0, help="CPU threads for torch (0 = all cores)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (weights init, batches, flips)."),
    compile_models: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the generator and discriminator."),
    cuda_graphs: bool = typer.Option(None, "--cuda-graphs/--no-cuda-graphs", help="Compile with CUDA graphs (mode reduce-overhead)."),
    deterministic: bool = typer.Option(None, "--deterministic/--no-deterministic", help="Deterministic kernels: exact resume (slower on GPUs)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    write_cache: Path = typer.Option(None, "--write-cache", help="Instead of training: pack DATA's train+val faces into this .npz cache (one file to ship to a GPU machine)."),
    cache_jpeg: int = typer.Option(0, "--cache-jpeg", min=0, max=100, help="With --write-cache: JPEG quality for the HR crops (e.g. 95, ~7.5 KiB/face); 0 = lossless (~40 KiB/face)."),
) -> None:
    """Train a face super-resolution model (IP-FSRGAN, Eq. 1-7) and optionally export it."""
    if write_cache is not None:
        try:
            if len(data) != 1:
                fail("--write-cache packs one prepared folder at a time")
            path = write_face_cache(data[0], write_cache, jpeg_quality=cache_jpeg, progress=progress)
        except DatasetError as exc:
            fail(str(exc))
        console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); train from it: fsr train {path} ...")
        return
    options = {
        "train.steps": steps, "train.batch_size": batch_size, "train.seed": seed,
        "loss.weights": _value(weights_preset), "loss.margin": id_margin if id_margin is not None else old_margin,
        "loss.id_model": _value(id_model),
        "loss.id_weights": str(id_weights) if id_weights else None,
        "loss.vgg_weights": str(vgg_weights) if vgg_weights else None, "loss.perceptual_net": _value(perceptual),
        "compute.device": device, "compute.precision": precision, "compute.threads": threads,
        "compute.compile": compile_models, "compute.cuda_graphs": cuda_graphs, "compute.deterministic": deterministic,
    }
    if not progress:
        overrides = list(overrides or []) + ["train.progress=false"]
    try:
        config = resolve_run_config(run_dir, resume=resume, preset=_value(preset), config_file=config_file,
                                    options=options, overrides=overrides or [])
        result = run_training(data, run_dir, config, resume=resume, export=export, force_export=force,
                              command=shlex.join(["fsr", *sys.argv[1:]]))
    except (ConfigError, DatasetError, TrainingError, WeightsError, FileNotFoundError) as exc:
        fail(str(exc))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if result.start_step == result.step:
        console.print(f"nothing to train: {run_dir} is already at step {result.step}")
    else:
        console.print(f"trained steps {result.start_step}..{result.step} in {result.seconds:.1f} s "
                      f"({result.steps_per_second:.2f} it/s); run dir {run_dir}")
    if result.metrics:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items())
        base = ", ".join(f"{k} {v:.4f}" for k, v in result.bicubic.items())
        console.print(f"validation: {shown} (bicubic: {base})")
    if result.export:
        console.print(f"exported {result.export[0]} + {result.export[1].name}; use: fsr upscale --model {result.export[0]}")
