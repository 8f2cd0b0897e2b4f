"""The training loop behind ``fsr train``: data, steps, validation, logs, checkpoints, export.

``run_training(data, run_dir, config)`` trains G (and D) per :class:`fsr.train.config.Config`
on a prepared set (or its ``.npz`` cache), validates the EMA generator every
``train.val_every`` steps on held-out faces (PSNR, SSIM, identity cosine), keeps the best,
checkpoints atomically every ``train.checkpoint_every`` steps, resumes exactly from the
newest complete checkpoint, and exports NAME.safetensors + NAME.json for ``fsr upscale``.
Under ``torchrun`` every process runs this function (DDP); rank 0 does all file I/O.
"""

from __future__ import annotations

import contextlib
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
import yaml

from fsr import __version__
from fsr.core.batching import make_progress
from fsr.core.device import Compute, machine_description, precision_name
from fsr.core.io import atomic_write_text, to_uint8, write_image
from fsr.core.weights import load_safetensors, state_dict_mismatch
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
from fsr.data.identities import held_out_celeba_identities
from fsr.models.rrdb import RRDBNet, deepen_rrdb_state, widen_rrdb_state
from fsr.models.sr import ModelCard, export_sr_model
from fsr.train.checkpoint import find_latest_checkpoint, save_best, save_checkpoint
from fsr.train.config import Config, ConfigError, build_config, config_from_dict, dump_config, merge_options
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
        return merge_options(config_from_dict(yaml.safe_load(saved.read_text())), options, overrides).validate()
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
            # imported here: the face models load only when a run needs the identity network
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
            # imported here: VGG19 is needed only for the perceptual loss
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
    (``None``: bicubic upsampling). Returns (metrics, SR images (N,3,128,128) [0,1]).
    On the CPU it runs in fp32 whatever the training precision, as ``fsr upscale`` does there."""
    import piq

    precision = compute.autocast if compute.device.type != "cpu" else contextlib.nullcontext

    outs = []
    was_training = generator.training if generator is not None else False
    if generator is not None:
        generator.eval()
    for start in range(0, batch.lr.shape[0], chunk):
        lr = batch.lr[start:start + chunk]
        if generator is None:
            sr = bicubic_up(lr, 4)
        else:
            with precision():
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
            with precision():
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
    """What the model card records of the training data; ``train_faces_of_held_out_identities``:
    training faces whose identity is named in ``fsr:celeba-test`` (fsr's held-out CelebA split)."""
    held_out = held_out_celeba_identities()
    names = np.asarray(arrays.identity_names, dtype=object)
    return {
        "source": arrays.source,
        "train_faces": int(len(train_idx)),
        "train_identities": int(len(np.unique(arrays.identity[train_idx]))),
        "val_faces": int(len(val_idx)),
        "val_identities": int(len(np.unique(arrays.identity[val_idx]))) if len(val_idx) else 0,
        "train_faces_of_held_out_identities": int(sum(name in held_out for name in names[arrays.identity[train_idx]])),
    }


def _warn_about_held_out_identities(data_info: dict) -> None:
    """Say when the training faces carry names of fsr's held-out CelebA identities."""
    count = data_info["train_faces_of_held_out_identities"]
    if count:
        warnings.warn(f"{count:,} training faces have identities of fsr's held-out CelebA split (fsr:celeba-test); this "
                      "model's figures on that split will not be held-out (fsr prepare --exclude-identities fsr:celeba-test "
                      "leaves them out)", stacklevel=2)


def run_training(data: str | Path | list, run_dir: str | Path, config: Config, *, resume: bool = False,
                 export: str | None = None, command: str | None = None, force_export: bool = False) -> TrainResult:
    """Train per ``config`` on ``data`` (prepared folder(s) or .npz cache), writing into ``run_dir``.

    ``resume``: continue from the newest complete checkpoint in ``run_dir`` (exactly: the
    same batches, flips and optimizer state as an uninterrupted run). ``export``: a name
    (written to ``run_dir/export/NAME.safetensors`` + ``.json``) or a path ending in
    ``.safetensors``; the export is the generator (raw or EMA) that validated best, and is
    refused when it is below bicubic on the validation split unless ``force_export``.
    Returns a :class:`TrainResult`.
    """
    run_dir = Path(run_dir)
    cfg = config.validate()
    configure_determinism(cfg)
    compute = Compute.create(cfg.compute.device, cfg.compute.precision, cfg.train.batch_size,
                             cfg.train.seed, cfg.compute.threads or None, cpu_auto_bf16=True)
    dist = init_distributed(compute.device)
    compute.device = local_device(compute.device, dist)
    if cfg.compute.deterministic and compute.device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    try:
        run = _open_run(data, run_dir, cfg, compute, dist, resume)
        final_step, seconds = _train_steps(run)
        return _finish_run(run, final_step, seconds, export, command, force_export)
    finally:
        cleanup(dist)


@dataclass
class _Run:
    """Everything one training run holds between its stages."""

    run_dir: Path
    cfg: Config
    compute: Compute
    dist: DistInfo
    trainer: SRTrainer
    losses: LossNetworks
    batcher: FaceBatcher
    sampler: IdentityBatchSampler
    val_batch: FaceBatch | None
    data_info: dict
    start_step: int = 0
    best: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    bicubic_metrics: dict = field(default_factory=dict)
    writer: object = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"


def _open_run(data, run_dir: Path, cfg: Config, compute: Compute, dist: DistInfo, resume: bool) -> _Run:
    """Plan and load: checkpoints, faces, networks, batchers, logs and the bicubic baseline."""
    ckpt_root = run_dir / CHECKPOINT_DIR
    latest = find_latest_checkpoint(ckpt_root) if resume else None
    if not resume and find_latest_checkpoint(ckpt_root) is not None:
        raise TrainingError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to continue it "
                            "or choose another --run-dir")
    barrier(dist)
    arrays = load_face_arrays(data, with_lr=cfg.data.lr_source == "disk",
                              splits=("train", cfg.data.val_split), max_faces=0, progress=dist.is_main and cfg.train.progress)
    train_idx, val_idx = split_train_val(arrays, cfg.data.val_split, cfg.data.val_fraction, cfg.train.seed)
    if cfg.data.max_faces:
        train_idx = train_idx[: cfg.data.max_faces]
    if len(train_idx) < 2:
        raise TrainingError(f"{data}: only {len(train_idx)} training faces")
    losses = build_loss_networks(cfg, compute, for_validation=dist.is_main)
    trainer = SRTrainer(cfg, compute, losses, dist)
    batcher = _train_batcher(arrays, train_idx, cfg, compute, trainer, dist)
    sampler = IdentityBatchSampler(batcher.identity_np, cfg.train.batch_size, cfg.train.faces_per_identity,
                                   seed=cfg.train.seed, rank=dist.rank)
    run = _Run(run_dir=run_dir, cfg=cfg, compute=compute, dist=dist, trainer=trainer, losses=losses,
               batcher=batcher, sampler=sampler, val_batch=None, data_info=_data_summary(arrays, train_idx, val_idx))
    if run.main:
        _warn_about_held_out_identities(run.data_info)
    _restore_state(run, latest)
    if run.main and len(val_idx):
        n_val = min(cfg.train.val_faces or len(val_idx), len(val_idx))
        chosen = val_idx[np.linspace(0, len(val_idx) - 1, n_val).round().astype(int)]  # spread over all parts
        run.val_batch = FaceBatcher(arrays, chosen, compute.device, lr_source=cfg.data.lr_source, flip=False,
                                    on_device=True).all_faces()
    if run.main:
        _open_logs(run)
    if run.val_batch is not None:
        run.bicubic_metrics, _ = evaluate_generator(None, run.val_batch, compute, losses.identity)
    return run


def _train_batcher(arrays: FaceArrays, train_idx: np.ndarray, cfg: Config, compute: Compute, trainer: SRTrainer,
                   dist: DistInfo) -> FaceBatcher:
    return FaceBatcher(arrays, train_idx, compute.device, lr_source=cfg.data.lr_source, flip=cfg.data.flip,
                       on_device=cfg.data.on_device, channels_last=trainer.channels_last,
                       alpha_augment=cfg.data.alpha_augment, alpha_min=cfg.data.alpha_min,
                       scale_augment=cfg.data.scale_augment, scale_min=cfg.data.scale_min,
                       jpeg_augment=cfg.data.jpeg_augment,
                       jpeg_quality=(cfg.data.jpeg_quality_min, cfg.data.jpeg_quality_max),
                       seed=cfg.train.seed, rank=dist.rank)


def _restore_state(run: _Run, latest) -> None:
    """Initial weights (``model.init_weights``) for a new run, or the checkpoint's state on resume."""
    trainer = run.trainer
    if run.cfg.model.init_weights and latest is None:
        # imported here: fsr.models.systems pulls in the face models, needed only for this option
        from fsr.models.systems import load_generator_file

        init_model, _ = load_generator_file(run.cfg.model.init_weights)
        init_state = _init_state(init_model, trainer.generator, run.cfg.model.init_weights)
        # layers that no growth explains (another upsampler, ...)
        problems = state_dict_mismatch(trainer.generator.state_dict(), init_state)
        if problems:
            raise ConfigError(f"model.init_weights {run.cfg.model.init_weights}: does not fit the "
                              f"configured generator ({problems})")
        trainer.generator.load_state_dict(init_state)
        if trainer.ema is not None:
            trainer.ema.load_state_dict(init_state)
    if latest is None:
        return
    state = latest.load_state()
    trainer.load(latest.load_models(), state)
    run.start_step = int(state["step"])
    best = dict(state.get("best") or {})
    run.best = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in best.items()}
    run.last_metrics = dict(run.best.get("metrics", {}))


def _init_state(init_model: torch.nn.Module, generator: torch.nn.Module, source: str) -> dict:
    """``model.init_weights`` as a state for ``generator``: as is, or grown when the config asks for
    more feature/growth channels (:func:`fsr.models.rrdb.widen_rrdb_state`) or more RRDB blocks
    (:func:`fsr.models.rrdb.deepen_rrdb_state`) than the file has. Either way the grown generator
    starts computing exactly what the file computes."""
    if not (isinstance(generator, RRDBNet) and isinstance(init_model, RRDBNet)):
        return init_model.state_dict()
    state = init_model.state_dict()
    small, big = init_model.arch_args, generator.arch_args
    wider = (big["nf"], big["gc"]) != (small["nf"], small["gc"])
    deeper = len(generator.body) > len(init_model.body)
    if len(generator.body) < len(init_model.body):
        raise ConfigError(f"model.init_weights {source}: {len(init_model.body)} RRDB blocks, more than "
                          f"model.nb={len(generator.body)} (a model can be grown, not cut)")
    try:
        if wider:
            state = widen_rrdb_state(state, RRDBNet(**{**small, "nf": big["nf"], "gc": big["gc"]}))
            print(f"model.init_weights {source}: nf/gc {small['nf']}/{small['gc']} widened to "
                  f"{big['nf']}/{big['gc']} (new channels start at zero)")
        if deeper:
            state = deepen_rrdb_state(state, generator)
            print(f"model.init_weights {source}: {len(init_model.body)} RRDB blocks deepened to "
                  f"{len(generator.body)} (new blocks start as the identity)")
    except ValueError as exc:
        raise ConfigError(f"model.init_weights {source}: {exc}") from None
    return state


def _open_logs(run: _Run) -> None:
    """config.yaml, log.jsonl cut back to the resumed step, and TensorBoard (rank 0 only)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.run_dir / "config.yaml", dump_config(run.cfg))
    _truncate_log(run.log_path, run.start_step)
    try:
        # imported here: TensorBoard is optional and slow to import
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=run.start_step or None)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"TensorBoard logging off: {exc}", stacklevel=2)


def _train_steps(run: _Run) -> tuple[int, float]:
    """The step loop: train, log, validate, sample, checkpoint. Returns (final step, seconds)."""
    cfg, total_steps = run.cfg, run.cfg.train.steps
    meter = _RateMeter(run.start_step)
    progress = make_progress("it", disable=not (run.main and cfg.train.progress))
    step = run.start_step
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=run.start_step)
            threaded = not (cfg.data.on_device and run.compute.device.type == "cuda")
            for step, batch in Prefetcher(run.batcher, run.sampler, run.start_step, total_steps, threaded=threaded):
                meter.add(run.trainer.train_step(batch, step))
                done = step + 1
                progress.advance(task)
                if done % cfg.train.log_every == 0 or done == total_steps:
                    shown = _log_train(run, done, meter.flush(done))
                    progress.update(task, description=f"train {shown}")
                _after_step(run, done, total_steps)
    except KeyboardInterrupt:
        if run.writer is not None:
            run.writer.close()
        raise TrainingError(f"interrupted at step {max(step, run.start_step)}; "
                            f"resume with --resume --run-dir {run.run_dir}") from None
    seconds = meter.seconds()
    final_step = max(run.start_step, total_steps)
    if final_step > run.start_step:
        _checkpoint(run, final_step)
    if run.writer is not None:
        run.writer.close()
    return final_step, seconds


def _after_step(run: _Run, done: int, total_steps: int) -> None:
    cfg = run.cfg.train
    if cfg.val_every and (done % cfg.val_every == 0 or done == total_steps):
        _validate(run, done)
    if cfg.sample_every and (done % cfg.sample_every == 0 or done == total_steps):
        _sample(run, done)
    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != total_steps:
        _checkpoint(run, done)


class _RateMeter:
    """Running means of the step's loss terms and the step rate between log lines."""

    def __init__(self, start_step: int) -> None:
        self.t0 = self.tick_time = time.perf_counter()
        self.tick_step = start_step
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value)

    def flush(self, done: int) -> dict:
        means = {k: float(torch.stack(v).float().mean()) for k, v in self.values.items()}
        self.values.clear()
        now = time.perf_counter()
        means["it_per_s"] = (done - self.tick_step) / max(now - self.tick_time, 1e-9)
        self.tick_time, self.tick_step = now, done
        return means

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _log_train(run: _Run, done: int, means: dict) -> str:
    """One ``train`` line in log.jsonl and TensorBoard; returns the loss terms for the progress bar."""
    if run.main:
        lr_now = run.trainer.opt_g.param_groups[0]["lr"]
        _log_line(run.log_path, {"step": done, "kind": "train", "lr": lr_now, **means})
        if run.writer is not None:
            for key, value in means.items():
                run.writer.add_scalar(f"train/{key}", value, done)
            run.writer.add_scalar("train/lr", lr_now, done)
    return " ".join(f"{k[2:]}={v:.4g}" for k, v in means.items() if k.startswith("l_"))


def _checkpoint(run: _Run, at_step: int) -> None:
    if run.main:
        save_checkpoint(run.run_dir / CHECKPOINT_DIR, at_step, run.trainer.model_states(),
                        {**run.trainer.optimizer_state(), "best": run.best}, keep=run.cfg.train.keep_checkpoints)
    barrier(run.dist)


def _validate(run: _Run, at_step: int) -> None:
    """Validate the raw and the EMA generator; keep the better one in ``best/`` when it beats the best so far."""
    if not run.main or run.val_batch is None:
        return
    results = {name: evaluate_generator(net, run.val_batch, run.compute, run.losses.identity)[0]
               for name, net in run.trainer.candidate_generators().items()}
    key = run.cfg.train.best_metric if run.cfg.train.best_metric in results["generator"] else "psnr"
    winner = max(results, key=lambda name: results[name][key])
    run.last_metrics = {**results[winner], "weights_of": winner}
    _log_line(run.log_path, {"step": at_step, "kind": "val", **results[winner], "weights_of": winner,
                             "candidates": results, "bicubic": run.bicubic_metrics})
    if run.writer is not None:
        for name, metrics in results.items():
            for metric, value in metrics.items():
                run.writer.add_scalar(f"val/{name}/{metric}", value, at_step)
        for metric, value in run.bicubic_metrics.items():
            run.writer.add_scalar(f"val/bicubic/{metric}", value, at_step)
    if not run.best or results[winner][key] > run.best.get("value", -float("inf")):
        run.best = {"step": at_step, "metric": key, "value": results[winner][key], "metrics": results[winner],
                    "weights_of": winner}
        state = run.trainer.candidate_generators()[winner].state_dict()
        save_best(run.run_dir, state, {**run.best, "bicubic": run.bicubic_metrics})


def _sample(run: _Run, at_step: int) -> None:
    if not run.main or run.val_batch is None:
        return
    vb = run.val_batch
    n = min(8, vb.lr.shape[0])
    head = FaceBatch(vb.lr[:n], vb.hr[:n], vb.landmarks[:n], vb.identity[:n])
    _, sr = evaluate_generator(run.trainer.inference_generator(), head, run.compute, None)
    grid = sample_grid(head, sr, n)
    write_image(run.run_dir / "samples" / f"step_{at_step:08d}.png", grid)
    if run.writer is not None:
        run.writer.add_image("samples/bicubic_sr_hr", grid, at_step, dataformats="HWC")


def _finish_run(run: _Run, final_step: int, seconds: float, export: str | None, command: str | None,
                force_export: bool) -> TrainResult:
    """DDP consistency check, the result, and the export (rank 0)."""
    dist = run.dist
    if dist.enabled:
        in_sync = replicas_in_sync(run.trainer, dist)
        if run.main:
            _log_line(run.log_path, {"step": final_step, "kind": "ddp", "world_size": dist.world_size,
                                     "replicas_in_sync": in_sync})
        if not in_sync:
            warnings.warn("DDP replicas hold different generator weights at the end of training", stacklevel=2)
    done = final_step - run.start_step
    result = TrainResult(run_dir=run.run_dir, step=final_step, start_step=run.start_step, metrics=run.last_metrics,
                         best=run.best, bicubic=run.bicubic_metrics, seconds=seconds,
                         steps_per_second=done / seconds if seconds > 0 and done > 0 else 0.0)
    if export and run.main:
        result.export = export_trained_generator(run, export, final_step, command, force_export)
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


def chosen_export(run: _Run) -> tuple[dict[str, torch.Tensor], str, dict]:
    """The generator to export: the best validated one in ``best/`` (raw or EMA), else the
    inference generator. Returns (state dict, which weights, its validation metrics)."""
    best_file = run.run_dir / "best" / "generator.safetensors"
    if run.best and best_file.is_file():
        return load_safetensors(best_file), run.best.get("weights_of", "generator_ema"), dict(run.best["metrics"])
    name = "generator_ema" if run.trainer.ema is not None else "generator"
    return run.trainer.inference_generator().state_dict(), name, dict(run.last_metrics)


def check_against_bicubic(metrics: dict, bicubic: dict, force: bool) -> None:
    """Refuse (TrainingError) an export whose validation PSNR or SSIM is below bicubic's, unless ``force``."""
    if not metrics or not bicubic:
        warnings.warn("no validation split: the export is not checked against bicubic", stacklevel=2)
        return
    worse = [f"{k} {metrics[k]:.4f} < bicubic {bicubic[k]:.4f}" for k in ("psnr", "ssim")
             if k in metrics and k in bicubic and metrics[k] < bicubic[k]]
    if worse and not force:
        raise TrainingError("export refused: the model is below bicubic on its validation split ("
                            + ", ".join(worse) + "); train longer, or pass --force to export it anyway")
    if worse:
        warnings.warn("exporting a model below bicubic (--force): " + ", ".join(worse), stacklevel=2)


def export_trained_generator(run: _Run, export: str, step: int, command: str | None,
                             force: bool = False) -> tuple[Path, Path]:
    """Export the best validated generator with its model card (refused below bicubic unless ``force``)."""
    cfg, trainer = run.cfg, run.trainer
    tensors, weights_of, metrics = chosen_export(run)
    check_against_bicubic(metrics, run.bicubic_metrics, force)
    out_path = export_path(export, run.run_dir)
    card = ModelCard(
        architecture=cfg.model.arch,
        arch_args=dict(getattr(trainer.generator, "arch_args", cfg.model.generator_args())),
        scale=4,
        name=out_path.stem,
        input_size=32,
        output_size=128,
        training_data=run.data_info,
        metrics={"validation": metrics, "bicubic": run.bicubic_metrics},
        extra={
            "weights_of": weights_of,
            "best_step": run.best.get("step", step) if run.best else step,
            "preset": cfg.preset,
            "steps": step,
            "config": cfg.to_dict(),
            "command": command if command is not None else " ".join(sys.argv),
            "hardware": {"machine": machine_description(), "compute": run.compute.describe(),
                         "precision": precision_name(run.compute.dtype), "processes": run.dist.world_size},
            "fsr_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return export_sr_model(tensors, out_path, card)
