"""fsr train on real faces prepared by `fsr prepare`: batches, configs, a tiny run whose loss
falls, exact resume after SIGKILL, atomic checkpoints, export, the identity loss on real faces,
and a 2-process gloo DDP run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fsr.cli import app
from fsr.data.identities import held_out_celeba_identities
from fsr.data.manifest import read_manifest
from tests.conftest import CELEBA_DIR, REPO

FSR = [sys.executable, "-m", "fsr.cli"]
TINY = ["--set", "model.nf=8", "--set", "model.nb=1", "--set", "model.gc=8", "--set", "model.d_nf=8"]
TINY_OPTIONS = {"model.nf": 8, "model.nb": 1, "model.gc": 8, "model.d_nf": 8}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Six CelebA identities x 5 photos, prepared by the real `fsr prepare` (1 identity in val)."""
    src = tmp_path_factory.mktemp("celeba_src")
    identities = sorted(p for p in CELEBA_DIR.iterdir() if p.is_dir())[:6]
    for identity in identities:
        (src / identity.name).mkdir()
        for photo in sorted(identity.glob("*.jpg"))[:5]:
            shutil.copy(photo, src / identity.name / photo.name)
    dst = tmp_path_factory.mktemp("prepared") / "faces"
    result = CliRunner().invoke(app, ["prepare", str(src), str(dst), "--val-fraction", "0.2", "--test-fraction", "0",
                                      "--device", "cpu", "--threads", "2", "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (dst / "manifest.csv").is_file()
    return dst


def _run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def _log(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


# --- data --------------------------------------------------------------------------------------

def test_identity_batches_always_hold_pairs_and_flips_mirror_landmarks(prepared):
    from fsr.data.dataset import FaceBatcher, IdentityBatchSampler, load_face_arrays, split_train_val

    arrays = load_face_arrays(prepared, with_lr=True)
    train, val = split_train_val(arrays)
    assert len(train) >= 20 and len(val) >= 4
    assert not set(arrays.identity[train]) & set(arrays.identity[val])
    sampler = IdentityBatchSampler(arrays.identity[train], batch_size=8, faces_per_identity=2, seed=3)
    for step in range(50):
        idx, flips = sampler.batch(step)
        ids = arrays.identity[train][idx]
        assert len(idx) == 8 and len(set(ids)) < len(ids)  # at least one same-identity pair
        again, flips_again = sampler.batch(step)
        assert np.array_equal(idx, again) and np.array_equal(flips, flips_again)
    assert not np.array_equal(sampler.batch(0)[0], sampler.batch(1)[0])

    for lr_source in ("disk", "bicubic"):
        batcher = FaceBatcher(arrays, train, torch.device("cpu"), lr_source=lr_source, flip=True, on_device=True)
        idx = np.array([0, 1])
        plain = batcher.make(idx, np.array([False, False]))
        flipped = batcher.make(idx, np.array([True, False]))
        assert torch.equal(flipped.hr[0], plain.hr[0].flip(-1)) and torch.equal(flipped.hr[1], plain.hr[1])
        assert torch.allclose(flipped.lr[0], plain.lr[0].flip(-1), atol=1.5 / 255)
        # left eye of the mirrored face = mirrored right eye of the original, and so on
        lm, lm_f = plain.landmarks[0], flipped.landmarks[0]
        for a, b in ((0, 1), (1, 0), (2, 2), (3, 4), (4, 3)):
            assert float(lm_f[a, 0]) == pytest.approx(127 - float(lm[b, 0]))
            assert float(lm_f[a, 1]) == pytest.approx(float(lm[b, 1]))
        assert plain.lr.shape == (2, 3, 32, 32) and plain.hr.shape == (2, 3, 128, 128)
    # LR made on the fly equals the prepared LR crops (same bicubic_down) within a grey level or two
    disk = FaceBatcher(arrays, train, torch.device("cpu"), lr_source="disk", flip=False).make(np.arange(8))
    made = FaceBatcher(arrays, train, torch.device("cpu"), lr_source="bicubic", flip=False).make(np.arange(8))
    assert float((disk.lr - made.lr).abs().max()) <= 2.5 / 255


def test_alpha_augmentation_degrades_a_fraction_as_the_sweep_does(prepared):
    """data.alpha_augment: the chosen faces get exactly verify-sweep's alpha_degrade, the others
    are untouched, and the choice is a pure function of the step (exact resume)."""
    from fsr.data.degrade import alpha_degrade
    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val

    arrays = load_face_arrays(prepared)
    train, _ = split_train_val(arrays)
    plain = FaceBatcher(arrays, train, torch.device("cpu"), flip=False)
    augmented = FaceBatcher(arrays, train, torch.device("cpu"), flip=False, alpha_augment=0.5, alpha_min=0.1, seed=4)
    idx = np.arange(16)
    sizes_seen = []
    for step in range(6):
        sizes = augmented.degraded_sizes(step, 16)
        assert np.array_equal(sizes, augmented.degraded_sizes(step, 16))
        sizes_seen.append(sizes)
        clean, batch = plain.make(idx), augmented.make(idx, step=step)
        assert torch.equal(batch.hr, clean.hr)
        for i, side in enumerate(sizes):
            if side == 0:
                assert torch.equal(batch.lr[i], clean.lr[i])
            else:
                assert 3 <= side <= 31
                expected = alpha_degrade(clean.lr[i : i + 1], side / 32)[0]
                torch.testing.assert_close(batch.lr[i], expected)
                assert float((batch.lr[i] - clean.lr[i]).abs().max()) > 0.02  # really degraded
    counts = np.concatenate(sizes_seen) > 0
    assert 0.25 < counts.mean() < 0.75  # about half of 96 faces
    assert torch.equal(plain.make(idx, step=3).lr, plain.make(idx).lr)  # off by default


def test_face_cache_round_trip(prepared, tmp_path):
    from fsr.data.dataset import load_face_arrays, write_face_cache

    cache = write_face_cache(prepared, tmp_path / "faces.npz", with_lr=True, progress=False)
    a = load_face_arrays(prepared, with_lr=True, splits=("train", "val"))
    b = load_face_arrays(cache, with_lr=True)
    assert np.array_equal(a.hr, b.hr) and np.array_equal(a.lr, b.lr)
    assert np.array_equal(a.landmarks, b.landmarks) and np.array_equal(a.split, b.split)
    assert [a.identity_names[i] for i in a.identity] == [b.identity_names[i] for i in b.identity]
    assert cache.stat().st_size < a.hr.nbytes  # compressed
    small = write_face_cache(prepared, tmp_path / "faces_jpeg.npz", jpeg_quality=95, progress=False)
    c = load_face_arrays(small)
    assert small.stat().st_size < cache.stat().st_size / 3
    assert c.hr.shape == a.hr.shape and np.abs(c.hr.astype(int) - a.hr.astype(int)).mean() < 3
    assert np.array_equal(c.identity, a.identity) and np.array_equal(c.face_ids, a.face_ids)


def test_config_presets_files_and_overrides(tmp_path):
    from fsr.train.config import ConfigError, build_config

    paper = build_config("ipfsrgan")
    w = paper.loss.resolved_weights()
    assert (w.adversarial, w.identity, w.perceptual, w.pixel) == (0.005, 10.0, 0.01, 1.0)
    assert (paper.model.arch, paper.model.nf, paper.model.nb, paper.model.gc) == ("rrdb", 64, 23, 32)
    assert (paper.optim.lr_g, paper.optim.beta1, paper.optim.beta2) == (2e-4, 0.9, 0.999)
    assert build_config("esrgan").loss.resolved_weights().identity == 0.0
    assert build_config("srgan").model.arch == "srresnet"
    assert build_config("srcnn").loss.resolved_weights().adversarial == 0.0
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "esrgan"\n[model]\nnf = 16\n[loss]\nweights = "public-code"\nmargin = 0.3\n')
    cfg = build_config(config_file=toml, overrides=["train.lr=1e-4", "model.nb=2"])
    assert cfg.preset == "esrgan" and cfg.model.nf == 16 and cfg.model.nb == 2 and cfg.loss.margin == 0.3
    assert cfg.optim.lr_g == cfg.optim.lr_d == 1e-4
    assert cfg.loss.resolved_weights().perceptual == 1.0 and cfg.loss.resolved_weights().pixel == 0.01
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  batch_size: 8\ncompute:\n  deterministic: true\n")
    assert build_config(config_file=yml).train.batch_size == 8
    for bad in (["train.nope=1"], ["train.steps=ten"], ["loss.gan=wgan"], ["nodot=1"]):
        with pytest.raises(ConfigError):
            build_config(overrides=bad)


# --- training ------------------------------------------------------------------------------------

def test_tiny_l1_training_loss_falls_and_export_upscales(prepared, tmp_path):
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val
    from fsr.models.systems import load_sr_system

    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="training faces have identities of fsr's held-out CelebA split") as said:
        _run_cli([str(prepared), "--run-dir", str(run), "--preset", "esrgan", "--perceptual", "none", "--steps", "40",
                  "--batch-size", "8", "--device", "cpu", "--threads", "2", "--no-progress", "--export", "tiny", "--force",
                  *TINY, "--set", "loss.gan=none", "--set", "optim.lr_g=2e-3", "--set", "train.ema_decay=0.9",
                  "--set", "train.log_every=5", "--set", "train.val_every=20", "--set", "train.checkpoint_every=20"])
    train = _log(run, "train")
    assert len(train) == 8 and all(np.isfinite(r["l_pixel"]) for r in train)
    assert train[-1]["l_pixel"] < 0.6 * train[0]["l_pixel"], [r["l_pixel"] for r in train]
    val = _log(run, "val")
    assert len(val) == 2 and val[1]["psnr"] > val[0]["psnr"]
    for record in (val[-1], val[-1]["bicubic"]):  # dlib's raw distance SR-HR: 0 = same face, ~0.6 = other person
        assert 0.05 < record["identity_distance"] < 1.0 and -1 <= record["identity"] <= 1
    assert (run / "config.yaml").is_file() and (run / "best" / "generator.safetensors").is_file()
    assert list((run / "samples").glob("*.png")) and list((run / "tb").iterdir())

    card = json.loads((run / "export" / "tiny.json").read_text())
    for key in ("architecture", "arch_args", "scale", "input_size", "training_data", "steps", "config", "metrics", "command", "hardware"):
        assert key in card
    assert card["steps"] == 40 and card["arch_args"]["nf"] == 8 and card["training_data"]["train_faces"] >= 20
    # the fixture's first six CelebA identities include three of fsr's held-out ones: counted and said
    held_out = held_out_celeba_identities()
    seen = sum(r.split == "train" and r.identity in held_out for r in read_manifest(prepared))
    assert card["training_data"]["train_faces_of_held_out_identities"] == seen > 0
    assert f"{seen:,} training faces" in str([w.message for w in said][0])
    system = load_sr_system(str(run / "export" / "tiny.safetensors"), Compute.create("cpu"))
    arrays = load_face_arrays(prepared, with_lr=True)
    _, val_idx = split_train_val(arrays)
    faces = FaceBatcher(arrays, val_idx, torch.device("cpu"), lr_source="disk", flip=False).all_faces()
    sr = system.upscale(faces.lr)
    assert sr.shape == faces.hr.shape and float(sr.min()) >= 0 and float(sr.max()) <= 1
    psnr = float(10 * torch.log10(1 / ((sr - faces.hr) ** 2).mean()))
    best = max(val, key=lambda r: r["psnr"])
    assert psnr == pytest.approx(best["psnr"], abs=0.5)  # the export is the best validated generator
    assert card["weights_of"] == best["weights_of"] and set(best["candidates"]) == {"generator", "generator_ema"}

    # a finished run dir is never overwritten without --resume; resuming at the final step only re-exports
    again = CliRunner().invoke(app, ["train", str(prepared), "--run-dir", str(run), "--steps", "40", "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output
    _run_cli([str(prepared), "--run-dir", str(run), "--resume", "--no-progress", "--export", "again", "--force"])
    assert torch.equal(load_file(str(run / "export" / "again.safetensors"))["conv_first.weight"],
                       load_file(str(run / "export" / "tiny.safetensors"))["conv_first.weight"])


def test_short_run_never_exports_a_model_below_bicubic(prepared, tmp_path):
    """EMA warm-up keeps the EMA copy near the trained generator; an export below bicubic is refused
    (nothing written), and a model that beats bicubic is exported and really does beat it."""
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val
    from fsr.data.degrade import bicubic_up
    from fsr.models.systems import load_sr_system

    common = ["--preset", "esrgan", "--perceptual", "none", "--steps", "30", "--batch-size", "8", "--device", "cpu",
              "--threads", "2", "--no-progress", *TINY, "--set", "loss.gan=none", "--set", "optim.lr_g=2e-3",
              "--set", "train.ema_decay=0.999", "--set", "train.val_every=30"]
    dead = tmp_path / "dead"
    refused = CliRunner().invoke(app, ["train", str(prepared), "--run-dir", str(dead), *common, "--export", "dead"])
    assert refused.exit_code == 2 and "below bicubic" in refused.output and "--force" in refused.output
    assert not (dead / "export" / "dead.safetensors").exists()
    val = _log(dead, "val")[-1]["candidates"]  # with warm-up the EMA copy follows G (no 0.999 lag)
    assert abs(val["generator_ema"]["psnr"] - val["generator"]["psnr"]) < 1.5, val

    good = tmp_path / "good"
    _run_cli([str(prepared), "--run-dir", str(good), *common, "--set", "model.upsampler=pixelshuffle",
              "--set", "model.bicubic_skip=true", "--set", "optim.lr_g=5e-4", "--export", "good"])
    system = load_sr_system(str(good / "export" / "good.safetensors"), Compute.create("cpu"))
    arrays = load_face_arrays(prepared, with_lr=True)
    _, val_idx = split_train_val(arrays)
    faces = FaceBatcher(arrays, val_idx, torch.device("cpu"), lr_source="disk", flip=False).all_faces()
    mse = lambda a: float(((a - faces.hr) ** 2).mean())  # noqa: E731
    assert mse(system.upscale(faces.lr)) <= mse(bicubic_up(faces.lr, 4))


def test_validation_on_the_cpu_is_fp32_whatever_the_training_precision(prepared):
    """A bf16 training run on a CPU validates (and so picks its best checkpoint) in fp32: the same
    figures as an fp32 run's, and what `fsr upscale` computes there."""
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val
    from fsr.models.systems import load_sr_system
    from fsr.train.loop import evaluate_generator

    arrays = load_face_arrays(prepared, with_lr=True)
    _, val_idx = split_train_val(arrays)
    faces = FaceBatcher(arrays, val_idx, torch.device("cpu"), lr_source="disk", flip=False).all_faces()
    fp32 = Compute.create("cpu", "fp32")
    bf16 = Compute(device=torch.device("cpu"), dtype=torch.bfloat16)
    system = load_sr_system("fsr_fast", fp32)
    metrics_fp32, sr_fp32 = evaluate_generator(system.model, faces, fp32, None)
    metrics_bf16, sr_bf16 = evaluate_generator(system.model, faces, bf16, None)
    assert torch.equal(sr_fp32, sr_bf16) and metrics_fp32 == metrics_bf16
    assert torch.allclose(sr_fp32, system.upscale(faces.lr).clamp(0, 1), atol=1e-5)
    with bf16.autocast():  # the bf16 pass the old validation made differs
        assert not torch.equal(system.model(faces.lr).float().clamp(0, 1), sr_fp32)


_GROWTH_RUN = ["--preset", "esrgan", "--perceptual", "none", "--steps", "2", "--batch-size", "4", "--device", "cpu",
               "--threads", "2", "--no-progress", "--set", "loss.gan=none", "--set", "optim.lr_g=1e-7",
               "--set", "train.val_every=2", "--set", "train.checkpoint_every=2"]


def _fast_model_on_val_faces(prepared):
    """weights/fsr_fast, its model, the prepared set's validation faces and the model's mean
    per-face PSNR on them (as validation reports it)."""
    import piq

    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val
    from fsr.models.systems import load_generator_file

    shipped = REPO / "weights" / "fsr_fast.safetensors"
    small, _ = load_generator_file(shipped)
    arrays = load_face_arrays(prepared, with_lr=True)
    _, val_idx = split_train_val(arrays)
    faces = FaceBatcher(arrays, val_idx, torch.device("cpu"), lr_source="bicubic", flip=False).all_faces()
    with torch.no_grad():
        psnr = float(piq.psnr(small.eval()(faces.lr).clamp(0, 1), faces.hr, data_range=1.0))
    return shipped, small, faces, psnr


def _train_grown(prepared, run: Path, shipped: Path, arch: dict) -> dict:
    """Two steps of `fsr train` (lr 1e-7) from ``shipped`` grown to ``arch``; the step-2 generator."""
    _run_cli([str(prepared), "--run-dir", str(run), *_GROWTH_RUN, "--set", f"model.init_weights={shipped}",
              *[f"--set=model.{k}={str(v).lower()}" for k, v in arch.items()
                if k in ("nf", "nb", "gc", "upsampler", "bicubic_skip")]])
    return _ckpt_tensors(run, 2)["generator"]


def test_deepened_generator_starts_as_the_shipped_one_and_trains_its_new_blocks(prepared, tmp_path):
    """model.init_weights with fewer RRDB blocks than model.nb: the deeper generator computes what
    the shipped one computes on real faces, and training reaches the new blocks."""
    from fsr.models.rrdb import RRDBNet, deepen_rrdb_state

    shipped, small, faces, shipped_psnr = _fast_model_on_val_faces(prepared)
    args = {**small.arch_args, "nb": len(small.body) + 2}
    deep = RRDBNet(**args)
    deep.load_state_dict(deepen_rrdb_state(small.state_dict(), deep))
    with torch.no_grad():
        assert torch.allclose(deep.eval()(faces.lr), small(faces.lr), atol=1e-5)
    with pytest.raises(ValueError, match="differ beyond"):
        deepen_rrdb_state(small.state_dict(), RRDBNet(**{**args, "gc": 8}))

    trained = _train_grown(prepared, tmp_path / "deep", shipped, args)
    assert _log(tmp_path / "deep", "val")[-1]["psnr"] == pytest.approx(shipped_psnr, abs=0.02)
    new_conv = f"body.{len(small.body)}.rdb1.conv5.weight"
    assert trained[new_conv].abs().max() > 0  # the zero-initialised convs receive gradients


def test_widened_generator_starts_as_the_shipped_one_and_trains_its_new_channels(prepared, tmp_path):
    """model.init_weights with fewer feature/growth channels (and blocks) than the config: the grown
    generator computes what the shipped one computes on real faces, the new channels learn, and a
    file that does not fit the config is refused in one line."""
    from fsr.models.rrdb import RRDBNet, widen_rrdb_state

    shipped, small, faces, shipped_psnr = _fast_model_on_val_faces(prepared)
    args = {**small.arch_args, "nf": small.arch_args["nf"] + 8, "gc": small.arch_args["gc"] + 4}
    wide = RRDBNet(**args)
    wide.load_state_dict(widen_rrdb_state(small.state_dict(), wide))
    with torch.no_grad():
        assert torch.allclose(wide.eval()(faces.lr), small(faces.lr), atol=1e-5)
    with pytest.raises(ValueError, match="cannot narrow"):
        widen_rrdb_state(wide.state_dict(), RRDBNet(**small.arch_args))

    grown = {**args, "nb": len(small.body) + 1}  # wider and deeper in one run
    trained = _train_grown(prepared, tmp_path / "wide", shipped, grown)
    assert _log(tmp_path / "wide", "val")[-1]["psnr"] == pytest.approx(shipped_psnr, abs=0.02)
    assert trained["conv_first.weight"].shape[0] == grown["nf"]
    assert trained["conv_first.weight"][small.arch_args["nf"]:].abs().max() > 0  # zero-initialised rows learn

    narrow, nf_gc = small.arch_args, [f"model.nf={small.arch_args['nf']}", f"model.gc={small.arch_args['gc']}"]
    for bad, expected in ((["model.nf=16", "model.gc=8"], "cannot narrow"),
                          ([*nf_gc, "model.nb=1"], "can be grown, not cut"),
                          ([*nf_gc, f"model.nb={len(small.body)}", "model.upsampler=nearest"], "does not fit")):
        result = CliRunner().invoke(app, ["train", str(prepared), "--run-dir", str(tmp_path / expected[:8]),
                                          *_GROWTH_RUN, "--set", f"model.init_weights={shipped}",
                                          "--set", f"model.bicubic_skip={str(narrow['bicubic_skip']).lower()}",
                                          *[f"--set={b}" for b in bad]])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and lines[-1].startswith("error:") and expected in lines[-1], result.output


def test_ema_warmup_decay_ramps_to_the_configured_decay():
    from fsr.core.device import Compute
    from fsr.train.config import build_config
    from fsr.train.step import LossNetworks, SRTrainer

    config = build_config("esrgan", overrides=["model.nf=8", "model.nb=1", "model.gc=8", "loss.gan=none",
                                               "loss.perceptual_net=none", "train.ema_decay=0.999"])
    trainer = SRTrainer(config, Compute.create("cpu"), LossNetworks())
    decays = [trainer.ema_decay_at(s) for s in (0, 9, 99, 10_000, 100_000)]
    assert decays[0] == pytest.approx(2 / 11) and decays == sorted(decays) and decays[-1] == 0.999
    config.train.ema_warmup = False
    assert trainer.ema_decay_at(0) == 0.999


def _ckpt_tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step_{step:08d}"
    return {f.stem: load_file(str(f)) for f in folder.glob("*.safetensors")}


def test_resume_after_sigkill_reproduces_uninterrupted_weights(prepared, tmp_path):
    from fsr.train.loop import resolve_run_config, run_training

    common = ["--preset", "esrgan", "--perceptual", "none", "--batch-size", "4", "--device", "cpu", "--threads", "1",
              "--deterministic", "--no-progress", *TINY, "--set", "train.checkpoint_every=2",
              "--set", "train.val_every=0", "--set", "train.sample_every=0", "--set", "train.keep_checkpoints=50"]
    total = 16
    # interrupted run: started long, SIGKILLed once a checkpoint exists, then resumed to `total` steps
    killed = tmp_path / "killed"
    errors = tmp_path / "stderr.txt"
    with open(errors, "wb") as err:
        proc = subprocess.Popen([*FSR, "train", str(prepared), "--run-dir", str(killed), "--steps", "400", *common],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step_00000004").exists():
        if proc.poll() is not None:
            pytest.fail(f"training process ended early: {errors.read_text()[-2000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    from fsr.train.checkpoint import find_latest_checkpoint

    killed_at = find_latest_checkpoint(killed / "checkpoints").step
    assert 4 <= killed_at < total
    torch_threads = torch.get_num_threads()
    try:
        config = resolve_run_config(killed, resume=True, options={"train.steps": total})
        resumed = run_training(prepared, killed, config, resume=True)
        assert resumed.start_step == killed_at and resumed.step == total
        # uninterrupted reference run
        straight = tmp_path / "straight"
        config = resolve_run_config(straight, resume=False, preset="esrgan", overrides=[
            "loss.perceptual_net=none", "train.batch_size=4", "compute.device=cpu", "compute.threads=1",
            "compute.deterministic=true", "train.progress=false", "train.checkpoint_every=2", "train.val_every=0",
            "train.sample_every=0", *(f"{k}={v}" for k, v in TINY_OPTIONS.items()), f"train.steps={total}"])
        run_training(prepared, straight, config)
    finally:
        torch.set_num_threads(torch_threads)
    a, b = _ckpt_tensors(straight, total), _ckpt_tensors(killed, total)
    assert set(a) == set(b) == {"generator", "generator_ema", "discriminator"}
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs after resume"
    # and training did move the weights
    first = _ckpt_tensors(killed, 4)["generator"]
    assert not torch.equal(first["conv_first.weight"], a["generator"]["conv_first.weight"])


def test_half_written_checkpoints_are_never_read(tmp_path):
    from fsr.train.checkpoint import find_latest_checkpoint, save_checkpoint

    root = tmp_path / "checkpoints"
    models = {"generator": {"w": torch.arange(4.0)}}
    save_checkpoint(root, 2, models, {"optimizer_g": {}}, keep=5)
    save_checkpoint(root, 4, {"generator": {"w": torch.arange(4.0) * 2}}, {"optimizer_g": {}}, keep=5)
    # what a SIGKILL can leave behind: a temporary folder, a renamed folder without its marker
    # (impossible with os.replace, but guard anyway), a checkpoint whose file was truncated later
    (root / ".tmp-step_00000006-1-1").mkdir()
    (root / ".tmp-step_00000006-1-1" / "generator.safetensors").write_bytes(b"\x00" * 10)
    (root / "step_00000008").mkdir()
    (root / "step_00000008" / "generator.safetensors").write_bytes(b"half")
    save_checkpoint(root, 10, {"generator": {"w": torch.ones(4)}}, {"optimizer_g": {}}, keep=5)
    with open(root / "step_00000010" / "generator.safetensors", "r+b") as fh:
        fh.truncate(20)
    latest = find_latest_checkpoint(root)
    assert latest.step == 4
    assert torch.equal(latest.load_models()["generator"]["w"], torch.arange(4.0) * 2)
    assert latest.load_state()["step"] == 4
    # the next save cleans up temporary folders and keeps only `keep` complete checkpoints
    save_checkpoint(root, 12, models, {"optimizer_g": {}}, keep=1)
    names = sorted(p.name for p in root.iterdir())
    assert ".tmp-step_00000006-1-1" not in names and "step_00000002" not in names and "step_00000012" in names


def test_missing_vgg_weights_is_a_one_line_error(prepared, tmp_path):
    result = CliRunner().invoke(app, ["train", str(prepared), "--run-dir", str(tmp_path / "r"), "--steps", "1",
                                      "--device", "cpu", "--no-progress", *TINY])
    assert result.exit_code == 2 and "--vgg-weights" in result.output


def test_ipfsrgan_step_with_identity_loss_on_real_faces(prepared, tmp_path):
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, IdentityBatchSampler, load_face_arrays, split_train_val
    from fsr.train.config import build_config
    from fsr.train.loop import build_loss_networks
    from fsr.train.step import SRTrainer

    cfg = build_config("ipfsrgan", overrides=["loss.perceptual_net=identity", "compute.device=cpu",
                                              *(f"{k}={v}" for k, v in TINY_OPTIONS.items())])
    compute = Compute.create("cpu", "fp32", 4)
    losses = _identity_losses_or_skip(cfg, compute, build_loss_networks)
    trainer = SRTrainer(cfg, compute, losses)
    arrays = load_face_arrays(prepared)
    train, _ = split_train_val(arrays)
    batcher = FaceBatcher(arrays, train, compute.device)
    sampler = IdentityBatchSampler(batcher.identity_np, 4)
    d_before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    logs = trainer.train_step(batcher.make(*sampler.batch(0)), 0)
    for key in ("l_pixel", "l_perceptual", "l_identity", "id_positive", "id_negative", "l_adv_g", "l_d"):
        assert key in logs and torch.isfinite(logs[key]), key
    assert float(logs["l_identity"]) > 0
    assert not torch.equal(d_before["conv0_0.weight"], trainer.discriminator.state_dict()["conv0_0.weight"])

    # Scale augmentation shrinks whole batches (faces of 16-31 px LR): the discriminator, built
    # for 128 px, sees real and fake faces resized alike, and both networks still learn.
    shrunk = FaceBatcher(arrays, train, compute.device, scale_augment=1.0, scale_min=0.5)
    step = next(s for s in range(1, 100) if shrunk.hr_side(s) < 120)
    batch = shrunk.make(*sampler.batch(step), step=step)
    assert batch.hr.shape[-1] == shrunk.hr_side(step) and batch.lr.shape[-1] * 4 == batch.hr.shape[-1]
    d_before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    logs = trainer.train_step(batch, step)
    for key in ("l_pixel", "l_identity", "l_adv_g", "l_d"):
        assert key in logs and torch.isfinite(logs[key]), key
    assert not torch.equal(d_before["conv0_0.weight"], trainer.discriminator.state_dict()["conv0_0.weight"])


def test_identity_and_perceptual_losses_share_one_identity_pass(prepared):
    """With identity features as φ (Eq. 6) and γ > 0 (Eq. 5), one forward pass of dlib gives
    both terms: the same losses and the same updated generator as two separate passes."""
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, IdentityBatchSampler, load_face_arrays, split_train_val
    from fsr.train.config import build_config
    from fsr.train.loop import build_loss_networks
    from fsr.train.step import SRTrainer

    cfg = build_config("ipfsrgan", overrides=["loss.perceptual_net=identity", "compute.device=cpu",
                                              *(f"{k}={v}" for k, v in TINY_OPTIONS.items())])
    compute = Compute.create("cpu", "fp32", 4)
    arrays = load_face_arrays(prepared)
    train, _ = split_train_val(arrays)
    batcher = FaceBatcher(arrays, train, compute.device)
    batch = batcher.make(*IdentityBatchSampler(batcher.identity_np, 4).batch(0))
    results = {}
    for shared in (True, False):
        trainer = SRTrainer(cfg, compute, _identity_losses_or_skip(cfg, compute, build_loss_networks))
        assert trainer.shared_identity_pass
        trainer.shared_identity_pass = shared
        logs = trainer.train_step(batch, 0)
        results[shared] = (logs, trainer.generator.state_dict())
    (logs_a, g_a), (logs_b, g_b) = results[True], results[False]
    for key in ("l_perceptual", "l_identity", "l_adv_g", "l_g_total"):
        assert torch.allclose(logs_a[key], logs_b[key], rtol=1e-5, atol=1e-7), key
    assert all(torch.allclose(g_a[k], g_b[k], rtol=1e-4, atol=1e-6) for k in g_a)


def _identity_losses_or_skip(cfg, compute, build):
    from fsr.core.weights import WeightsError
    from fsr.train.loop import TrainingError

    try:
        return build(cfg, compute)
    except (TrainingError, WeightsError) as exc:
        if "not found" in str(exc):
            pytest.skip(f"dlib weights not available yet: {exc}")
        raise


def test_identity_loss_separates_same_and_different_people_on_real_faces(prepared):
    from fsr.core.device import Compute
    from fsr.data.dataset import FaceBatcher, load_face_arrays
    from fsr.train.config import build_config
    from fsr.train.loop import build_loss_networks
    from fsr.train.losses import identity_loss, same_identity_matrix

    compute = Compute.create("cpu", "fp32", 16)
    losses = _identity_losses_or_skip(build_config("ipfsrgan", overrides=["loss.perceptual_net=none"]), compute,
                                      build_loss_networks)
    arrays = load_face_arrays(prepared)
    faces = FaceBatcher(arrays, np.arange(len(arrays)), compute.device, flip=False).all_faces()
    with torch.no_grad():
        emb = losses.identity.embed(faces.hr, faces.landmarks)
        # the LR faces brought back by bicubic: what the generator starts from
        from fsr.data.degrade import bicubic_up

        emb_up = losses.identity.embed(bicubic_up(faces.lr), faces.landmarks)
    same = same_identity_matrix(faces.identity)
    cosine = emb @ emb.t()
    off = ~torch.eye(len(emb), dtype=torch.bool)
    pos, neg = cosine[same & off].mean(), cosine[~same].mean()
    assert float(pos) > float(neg) + 0.3, (float(pos), float(neg))  # centred descriptors separate people
    assert float(neg) < 0.3
    # Eq. 5 with the true labels is far lower than with shuffled labels
    true_loss, parts = identity_loss(emb_up, emb, same, margin=0.0)
    perm = torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))
    wrong_loss, _ = identity_loss(emb_up, emb, same_identity_matrix(faces.identity[perm]), margin=0.0)
    assert float(true_loss) < float(wrong_loss)
    assert float(parts["cos_positive"]) > float(parts["cos_negative"]) + 0.3


def test_ddp_two_processes_gloo(prepared, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "fsr.cli", "train", str(prepared),
           "--run-dir", str(run), "--preset", "esrgan", "--perceptual", "none", "--steps", "3", "--batch-size", "4",
           "--device", "cpu", "--threads", "1", "--no-progress", *TINY, "--set", "train.log_every=1",
           "--export", "ddp", "--force"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = _log(run, "ddp")
    assert ddp == [{"step": 3, "kind": "ddp", "world_size": 2, "replicas_in_sync": True}]
    assert len(_log(run, "train")) == 3
    assert (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert json.loads((run / "export" / "ddp.json").read_text())["hardware"]["processes"] == 2


def test_jpeg_augmentation_compresses_a_fraction_with_the_block_grid_anywhere(prepared):
    """data.jpeg_augment: the chosen LR faces are exactly jpeg_degrade of the clean LR at the
    drawn quality and grid offset, the others untouched; the choice is a pure function of the step."""
    from fsr.data.degrade import JPEG_BLOCK, jpeg_degrade
    from fsr.data.dataset import FaceBatcher, load_face_arrays, split_train_val

    arrays = load_face_arrays(prepared)
    train, _ = split_train_val(arrays)
    plain = FaceBatcher(arrays, train, torch.device("cpu"), flip=False)
    augmented = FaceBatcher(arrays, train, torch.device("cpu"), flip=False, jpeg_augment=0.5, jpeg_quality=(30, 60), seed=2)
    idx = np.arange(16)
    chosen = []
    for step in range(6):
        qualities, offsets = augmented.jpeg_choices(step, 16)
        again = augmented.jpeg_choices(step, 16)
        assert np.array_equal(qualities, again[0]) and np.array_equal(offsets, again[1])
        assert ((offsets >= 0) & (offsets < JPEG_BLOCK)).all()
        clean, batch = plain.make(idx), augmented.make(idx, step=step)
        assert torch.equal(batch.hr, clean.hr)
        for i, quality in enumerate(qualities):
            if quality == 0:
                assert torch.equal(batch.lr[i], clean.lr[i])
                continue
            assert 30 <= quality <= 60
            expected = jpeg_degrade(clean.lr[i : i + 1], [int(quality)], [tuple(offsets[i])])[0]
            assert torch.equal(batch.lr[i], expected)
            assert float((batch.lr[i] - clean.lr[i]).abs().mean()) > 1.0 / 255  # really compressed
        chosen.append(qualities > 0)
    assert 0.25 < np.concatenate(chosen).mean() < 0.75  # about half of 96 faces
    assert torch.equal(plain.make(idx, step=3).lr, plain.make(idx).lr)  # off by default


def test_jpeg_config_ranges_are_checked():
    from fsr.train.config import Config, ConfigError

    for bad in ({"jpeg_augment": 1.5}, {"jpeg_quality_min": 0}, {"jpeg_quality_min": 90, "jpeg_quality_max": 80},
                {"jpeg_quality_max": 101}):
        cfg = Config()
        for key, value in bad.items():
            setattr(cfg.data, key, value)
        with pytest.raises(ConfigError, match="jpeg"):
            cfg.validate()
