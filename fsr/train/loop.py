"""The training loop behind ``fsr train``: data, steps, validation, logs, checkpoints, export.

``run_training(data, run_dir, config)`` trains G (and D) per :class:`fsr.train.config.Config`
on a prepared set (or its ``.npz`` cache), validates the EMA generator every
``train.val_every`` steps on held-out faces (PSNR, SSIM, identity cosine), keeps the best,
checkpoints atomically every ``train.checkpoint_every`` steps, resumes exactly from the
newest complete checkpoint, and exports NAME.safetensors + NAME.json for ``fsr upscale``.
Under ``torchrun`` every process runs this function (DDP); rank 0 does all file I/O.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fsr import __version__
from fsr.core.batching import make_progress
from fsr.core.device import Compute, machine_description, precision_name
from fsr.core.io import atomic_write_text, to_uint8, write_image
from fsr.data.dataset import (
    FaceArrays,
    FaceBatch,
    FaceBatcher,
    IdentityBatchSampler,
    Prefetcher,
    load_face_arrays,
    split_train_val,
)
from fsr.data.degrade import bicubic_up
from fsr.models.sr import ModelCard, export_sr_model
from fsr.train.checkpoint import find_latest_checkpoint, save_best, save_checkpoint
from fsr.train.config import Config, apply_mapping, apply_override, build_config, config_from_dict, dump_config
from fsr.train.distributed import DistInfo, barrier, cleanup, init_distributed, local_device
from fsr.train.losses import IdentityFeatures, PerceptualFeatures
from fsr.train.step import LossNetworks, SRTrainer

CHECKPOINT_DIR = "checkpoints"


class TrainingError(RuntimeError):
    """A training run that cannot start or continue (one-line message)."""


@dataclass
class TrainResult:
    """What a run did: final step, last/best validation metrics, exported files."""

    run_dir: Path
    step: int
    start_step: int
    metrics: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    bicubic: dict = field(default_factory=dict)
    export: tuple[Path, Path] | None = None
    seconds: float = 0.0
    steps_per_second: float = 0.0


# --- configuration of a run -----------------------------------------------------------------

def resolve_run_config(run_dir: str | Path, *, resume: bool, preset: str | None = None,
                       config_file: str | Path | None = None, options: dict | None = None,
                       overrides: list[str] | None = None) -> Config:
    """The config a run uses. Resuming: the run's saved ``config.yaml`` plus ``options`` and
    ``overrides`` (e.g. more steps); otherwise preset -> file -> options -> overrides."""
    saved = Path(run_dir) / "config.yaml"
    if resume and saved.is_file():
        import yaml

        config = config_from_dict(yaml.safe_load(saved.read_text()))
        for dotted, value in (options or {}).items():
            if value is not None:
                section, key = dotted.split(".", 1)
                apply_mapping(config, {section: {key: value}}, f"option {dotted}")
        for override in overrides or []:
            apply_override(config, override)
        return config.validate()
    return build_config(preset, config_file, options, overrides)


def build_loss_networks(config: Config, compute: Compute, *, for_validation: bool = True) -> LossNetworks:
    """Load the identity network F (Eq. 5) and the perceptual network φ (Eq. 6) the config asks for.

    The identity network is required when γ > 0 or ``perceptual_net = identity``; otherwise it
    is loaded, if it can be, only to report the identity cosine during validation.
    """
    weights = config.loss.resolved_weights()
    need_identity = weights.identity > 0 or (weights.perceptual > 0 and config.loss.perceptual_net == "identity")
    identity = None
    if need_identity or for_validation:
        try:
            from fsr.models.face import create_face_model

            model = create_face_model(config.loss.id_model, weights=config.loss.id_weights or None, compute=compute)
            identity = IdentityFeatures(model)
        except Exception as exc:  # noqa: BLE001
            if need_identity:
                raise TrainingError(f"identity network '{config.loss.id_model}' unavailable: {exc}") from None
            warnings.warn(f"identity cosine not reported in validation: {exc}", stacklevel=2)
    perceptual = None
    if weights.perceptual > 0 and config.loss.perceptual_net != "none":
        if config.loss.perceptual_net == "vgg":
            from fsr.models.vgg import VGG19Features

            perceptual = PerceptualFeatures("vgg", VGG19Features.from_checkpoint(config.loss.vgg_weights,
                                                                                  config.loss.perceptual_layers))
        else:
            perceptual = PerceptualFeatures("identity", identity)
    return LossNetworks(identity=identity, perceptual=perceptual)


def configure_determinism(config: Config) -> None:
    """Deterministic kernels (``compute.deterministic``): exact replays, slower on GPUs."""
    if config.compute.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# --- validation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate_generator(generator: torch.nn.Module | None, batch: FaceBatch, compute: Compute,
                       identity: IdentityFeatures | None, chunk: int = 32) -> tuple[dict, torch.Tensor]:
    """PSNR (dB), SSIM, mean SR-HR identity cosine (normalised/centred embeddings) and mean
    Euclidean distance of the raw embeddings (dlib's own measure) of ``generator`` on ``batch``
    (``None``: bicubic upsampling). Returns (metrics, SR images (N,3,128,128) [0,1])."""
    import piq

    outs = []
    was_training = generator.training if generator is not None else False
    if generator is not None:
        generator.eval()
    for start in range(0, batch.lr.shape[0], chunk):
        lr = batch.lr[start:start + chunk]
        if generator is None:
            sr = bicubic_up(lr, 4)
        else:
            with compute.autocast():
                sr = generator(lr)
        outs.append(sr.float().clamp(0, 1))
    if generator is not None and was_training:
        generator.train()
    sr = torch.cat(outs)
    hr = batch.hr.float()
    metrics = {
        "psnr": float(piq.psnr(sr, hr, data_range=1.0, reduction="mean")),
        "ssim": float(piq.ssim(sr, hr, data_range=1.0, reduction="mean")),
    }
    if identity is not None:
        cos, dist = [], []
        for start in range(0, sr.shape[0], chunk):
            sl = slice(start, start + chunk)
            with compute.autocast():
                raw_a = identity.raw(sr[sl], batch.landmarks[sl])
                raw_b = identity.raw(hr[sl], batch.landmarks[sl])
            a, b = identity.model.normalize(raw_a), identity.model.normalize(raw_b)
            cos.append((a.float() * b.float()).sum(1))
            dist.append((raw_a - raw_b).norm(dim=1))
        metrics["identity"] = float(torch.cat(cos).mean())
        metrics["identity_distance"] = float(torch.cat(dist).mean())
    return metrics, sr


def sample_grid(batch: FaceBatch, sr: torch.Tensor, n: int = 8) -> np.ndarray:
    """Rows of bicubic | SR | HR for the first ``n`` validation faces, as uint8 HxWx3."""
    from torchvision.utils import make_grid

    n = min(n, sr.shape[0])
    rows = torch.cat([bicubic_up(batch.lr[:n].float(), 4).cpu(), sr[:n].cpu(), batch.hr[:n].float().cpu()])
    return to_uint8(make_grid(rows, nrow=n, padding=2, pad_value=1.0))


# --- the loop -------------------------------------------------------------------------------

def _log_line(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log records of steps after ``after_step`` (they are replayed after a resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= after_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _data_summary(arrays: FaceArrays, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    return {
        "source": arrays.source,
        "train_faces": int(len(train_idx)),
        "train_identities": int(len(np.unique(arrays.identity[train_idx]))),
        "val_faces": int(len(val_idx)),
        "val_identities": int(len(np.unique(arrays.identity[val_idx]))) if len(val_idx) else 0,
    }


def run_training(data: str | Path, run_dir: str | Path, config: Config, *, resume: bool = False,
                 export: str | None = None, command: str | None = None) -> TrainResult:
    """Train per ``config`` on ``data`` (prepared folder or .npz cache), writing into ``run_dir``.

    ``resume``: continue from the newest complete checkpoint in ``run_dir`` (exactly: the
    same batches, flips and optimizer state as an uninterrupted run). ``export``: a name
    (written to ``run_dir/export/NAME.safetensors`` + ``.json``) or a path ending in
    ``.safetensors``. Returns a :class:`TrainResult`.
    """
    run_dir = Path(run_dir)
    cfg = config.validate()
    configure_determinism(cfg)
    compute = Compute.create(cfg.compute.device, cfg.compute.precision, cfg.train.batch_size,
                             cfg.train.seed, cfg.compute.threads or None)
    dist = init_distributed(compute.device)
    compute.device = local_device(compute.device, dist)
    if cfg.compute.deterministic and compute.device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    try:
        return _train(data, run_dir, cfg, compute, dist, resume, export, command)
    finally:
        cleanup(dist)


def _train(data, run_dir: Path, cfg: Config, compute: Compute, dist: DistInfo, resume: bool,
           export: str | None, command: str | None) -> TrainResult:
    main = dist.is_main
    ckpt_root = run_dir / CHECKPOINT_DIR
    latest = find_latest_checkpoint(ckpt_root) if resume else None
    if not resume and find_latest_checkpoint(ckpt_root) is not None:
        raise TrainingError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to continue it "
                            "or choose another --run-dir")
    barrier(dist)

    arrays = load_face_arrays(data, with_lr=cfg.data.lr_source == "disk",
                              splits=("train", cfg.data.val_split), max_faces=0, progress=main and cfg.train.progress)
    train_idx, val_idx = split_train_val(arrays, cfg.data.val_split, cfg.data.val_fraction, cfg.train.seed)
    if cfg.data.max_faces:
        train_idx = train_idx[: cfg.data.max_faces]
    if len(train_idx) < 2:
        raise TrainingError(f"{data}: only {len(train_idx)} training faces")

    losses = build_loss_networks(cfg, compute, for_validation=main)
    trainer = SRTrainer(cfg, compute, losses, dist)
    if cfg.model.init_weights and latest is None:
        from fsr.models.systems import load_generator_file

        init_model, _ = load_generator_file(cfg.model.init_weights)
        trainer.generator.load_state_dict(init_model.state_dict())
        if trainer.ema is not None:
            trainer.ema.load_state_dict(init_model.state_dict())

    start_step = 0
    best: dict = {}
    if latest is not None:
        state = latest.load_state()
        trainer.load(latest.load_models(), state)
        start_step = int(state["step"])
        best = dict(state.get("best") or {})
        best = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in best.items()}

    on_device = cfg.data.on_device
    batcher = FaceBatcher(arrays, train_idx, compute.device, lr_source=cfg.data.lr_source, flip=cfg.data.flip,
                          on_device=on_device, channels_last=trainer.channels_last,
                          alpha_augment=cfg.data.alpha_augment, alpha_min=cfg.data.alpha_min,
                          seed=cfg.train.seed, rank=dist.rank)
    sampler = IdentityBatchSampler(batcher.identity_np, cfg.train.batch_size, cfg.train.faces_per_identity,
                                   seed=cfg.train.seed, rank=dist.rank)
    val_batch = None
    if main and len(val_idx):
        val_batcher = FaceBatcher(arrays, val_idx[: cfg.train.val_faces] if cfg.train.val_faces else val_idx,
                                  compute.device, lr_source=cfg.data.lr_source, flip=False, on_device=True)
        val_batch = val_batcher.all_faces()

    log_path = run_dir / "log.jsonl"
    writer = None
    data_info = _data_summary(arrays, train_idx, val_idx)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        _truncate_log(log_path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"TensorBoard logging off: {exc}", stacklevel=2)
    bicubic_metrics: dict = {}
    if val_batch is not None:
        bicubic_metrics, _ = evaluate_generator(None, val_batch, compute, losses.identity)

    last_metrics: dict = dict(best.get("metrics", {})) if best else {}
    total_steps = cfg.train.steps
    running: dict[str, list[torch.Tensor]] = {}
    t0 = time.perf_counter()
    tick_time, tick_step = t0, start_step
    step = start_step

    def checkpoint(at_step: int) -> None:
        if main:
            save_checkpoint(ckpt_root, at_step, trainer.model_states(),
                            {**trainer.optimizer_state(), "best": best}, keep=cfg.train.keep_checkpoints)
        barrier(dist)

    def validate(at_step: int) -> None:
        nonlocal last_metrics, best
        if not main or val_batch is None:
            return
        metrics, sr = evaluate_generator(trainer.inference_generator(), val_batch, compute, losses.identity)
        last_metrics = metrics
        _log_line(log_path, {"step": at_step, "kind": "val", **metrics, "bicubic": bicubic_metrics})
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"val/{key}", value, at_step)
            for key, value in bicubic_metrics.items():
                writer.add_scalar(f"val/bicubic_{key}", value, at_step)
        key = cfg.train.best_metric if cfg.train.best_metric in metrics else "psnr"
        if not best or metrics[key] > best.get("value", -float("inf")):
            best = {"step": at_step, "metric": key, "value": metrics[key], "metrics": metrics}
            save_best(run_dir, trainer.inference_generator().state_dict(), {**best, "bicubic": bicubic_metrics})

    def sample(at_step: int) -> None:
        if not main or val_batch is None:
            return
        n = min(8, val_batch.lr.shape[0])
        head = FaceBatch(val_batch.lr[:n], val_batch.hr[:n], val_batch.landmarks[:n], val_batch.identity[:n])
        _, sr = evaluate_generator(trainer.inference_generator(), head, compute, None)
        grid = sample_grid(head, sr, n)
        write_image(run_dir / "samples" / f"step_{at_step:08d}.png", grid)
        if writer is not None:
            writer.add_image("samples/bicubic_sr_hr", grid, at_step, dataformats="HWC")

    interrupted = False
    progress = make_progress("it", disable=not (main and cfg.train.progress))
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=start_step)
            threaded = not (on_device and compute.device.type == "cuda")
            for step, batch in Prefetcher(batcher, sampler, start_step, total_steps, threaded=threaded):
                logs = trainer.train_step(batch, step)
                for key, value in logs.items():
                    running.setdefault(key, []).append(value)
                done = step + 1
                progress.advance(task)
                if done % cfg.train.log_every == 0 or done == total_steps:
                    means = {k: float(torch.stack(v).float().mean()) for k, v in running.items()}
                    running.clear()
                    now = time.perf_counter()
                    rate = (done - tick_step) / max(now - tick_time, 1e-9)
                    tick_time, tick_step = now, done
                    if main:
                        lr_now = trainer.opt_g.param_groups[0]["lr"]
                        _log_line(log_path, {"step": done, "kind": "train", "lr": lr_now, "it_per_s": rate, **means})
                        if writer is not None:
                            for key, value in means.items():
                                writer.add_scalar(f"train/{key}", value, done)
                            writer.add_scalar("train/lr", lr_now, done)
                            writer.add_scalar("train/it_per_s", rate, done)
                        shown = " ".join(f"{k[2:] if k.startswith('l_') else k}={v:.4g}" for k, v in means.items()
                                         if k.startswith("l_"))
                        progress.update(task, description=f"train {shown}")
                if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == total_steps):
                    validate(done)
                if cfg.train.sample_every and (done % cfg.train.sample_every == 0 or done == total_steps):
                    sample(done)
                if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done != total_steps:
                    checkpoint(done)
            step = max(start_step, total_steps)
    except KeyboardInterrupt:
        interrupted = True
        step = step if step > start_step else start_step
    seconds = time.perf_counter() - t0
    final_step = max(start_step, min(total_steps, step if interrupted else total_steps))
    if not interrupted and final_step > start_step:
        checkpoint(final_step)
    if writer is not None:
        writer.close()
    if interrupted:
        raise TrainingError(f"interrupted at step {step}; resume with --resume --run-dir {run_dir}")

    if dist.enabled:
        in_sync = replicas_in_sync(trainer, dist)
        if main:
            _log_line(log_path, {"step": final_step, "kind": "ddp", "world_size": dist.world_size,
                                 "replicas_in_sync": in_sync})
        if not in_sync:
            warnings.warn("DDP replicas hold different generator weights at the end of training", stacklevel=2)
    result = TrainResult(run_dir=run_dir, step=final_step, start_step=start_step, metrics=last_metrics,
                         best=best, bicubic=bicubic_metrics, seconds=seconds,
                         steps_per_second=(final_step - start_step) / seconds if seconds > 0 else 0.0)
    if export and main:
        result.export = export_trained_generator(trainer, cfg, export, run_dir, final_step, last_metrics,
                                                 bicubic_metrics, data_info, compute, dist, command)
    barrier(dist)
    return result


@torch.no_grad()
def replicas_in_sync(trainer: SRTrainer, dist: DistInfo) -> bool:
    """True when every process holds the same G (and D) weights (DDP keeps them equal)."""
    import torch.distributed as tdist

    modules = [trainer.generator] + ([trainer.discriminator] if trainer.discriminator is not None else [])
    flat = torch.cat([p.detach().float().flatten() for m in modules for p in m.parameters()])
    lo, hi = flat.clone(), flat.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def export_path(export: str, run_dir: Path) -> Path:
    """``NAME`` -> ``run_dir/export/NAME.safetensors``; a path ending in .safetensors is used as is."""
    if export.endswith(".safetensors") or os.sep in export or "/" in export:
        path = Path(export).expanduser()
        return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    return run_dir / "export" / f"{export}.safetensors"


def export_trained_generator(trainer: SRTrainer, cfg: Config, export: str, run_dir: Path, step: int,
                             metrics: dict, bicubic: dict, data_info: dict, compute: Compute, dist: DistInfo,
                             command: str | None) -> tuple[Path, Path]:
    """Export G (EMA when enabled) with its model card."""
    generator = trainer.inference_generator()
    card = ModelCard(
        architecture=cfg.model.arch,
        arch_args=dict(getattr(generator, "arch_args", cfg.model.generator_args())),
        scale=4,
        name=export_path(export, run_dir).stem,
        input_size=32,
        output_size=128,
        training_data=data_info,
        metrics={"validation": metrics, "bicubic": bicubic},
        extra={
            "weights_of": "generator_ema" if trainer.ema is not None else "generator",
            "preset": cfg.preset,
            "steps": step,
            "config": cfg.to_dict(),
            "command": command if command is not None else " ".join(sys.argv),
            "hardware": {"machine": machine_description(), "compute": compute.describe(),
                         "precision": precision_name(compute.dtype), "processes": dist.world_size},
            "fsr_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return export_sr_model(generator.state_dict(), export_path(export, run_dir), card)
