"""Training-step speed: BasicSR-style eager fp32 vs fsr's optimised step, same device, one run.

Four timings at one batch size (16 by default), random weights, random faces:
  baseline GAN   ESRGAN step as BasicSR does it: G + VGG-128 D + VGG19 perceptual + L1,
                 fp32, NCHW, plain Adam, separate real/fake D passes, per-step .item() logging
  baseline L1    the same generator with an L1 loss only
  fsr full       fsr's IP-FSRGAN step (fsr.train.step.SRTrainer): G + D + VGG19 perceptual +
                 identity loss (Eq. 5, dlib) + L1, with bf16 autocast, channels_last, fused
                 Adam, on-device batches (+ --compile / --cuda-graphs)
  fsr L1         fsr's step with the L1 loss only

--perceptual identity times the fsr full step with the identity network's features as φ
(Eq. 6; the CPU recipe, configs/ipfsrgan_deep_cpu.toml) instead of VGG19, once as fsr runs it
(one identity pass gives the embedding and the features) and once with two separate passes.

The VGG19 is randomly initialised unless --vgg-weights is given (speed does not depend on
the weights). Usage:
  python benchmarks/train_step.py --device cuda                  # ESRGAN size (nf 64, nb 23)
  python benchmarks/train_step.py --device cuda --compile --cuda-graphs
  python benchmarks/train_step.py --device cpu --nf 16 --nb 2 --steps 5   # small CPU config
  python benchmarks/train_step.py --device cpu --variants --nf 32 --nb 2 --gc 16 \
      --upsampler pixelshuffle --bicubic-skip --skip-baseline --skip-fsr     # CPU speed options

--variants times the generator's L1 training step (batch 16, Adam) side by side under each
speed option: fp32 eager with all threads and with one, channels_last, bf16 autocast (with
and without channels_last), torch.compile (inductor) in fp32 and with bf16, and prints each
one's speed-up over fp32 eager. Whether bf16 helps depends on the CPU: with native bf16
(AVX-512 BF16, AMX) the 8-block RRDB step runs about 1.6x faster, on an AVX2-only CPU it is
several times slower (benchmarks/RESULTS.md).

--recipe CONFIG (repeatable) times the step of a training recipe as `fsr train --config
CONFIG` runs it (its generator, losses, identity and perceptual networks, batch size; random
faces) once in fp32 eager and once with bf16 autocast + channels_last, the speed options fsr
train picks on a CPU with native bf16:
  python benchmarks/train_step.py --device cpu --skip-baseline --skip-fsr \
      --recipe configs/identity_deep_cpu.toml --recipe configs/ipfsrgan_deep_cpu.toml
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsr.core.device import Compute, machine_description, precision_name, synchronize
from fsr.data.dataset import FaceArrays, FaceBatcher, IdentityBatchSampler
from fsr.models.discriminator import VGGStyleDiscriminator
from fsr.models.rrdb import RRDBNet
from fsr.models.vgg import VGG19Features
from fsr.train.config import build_config
from fsr.train.losses import IdentityFeatures, PerceptualFeatures
from fsr.train.step import LossNetworks, SRTrainer
from compute_args import add_compute_arguments

TEMPLATE = np.array([[45, 55], [83, 55], [64, 72], [50, 90], [78, 90]], np.float32)


def random_faces(n: int, ids: int, seed: int = 0) -> FaceArrays:
    rng = np.random.default_rng(seed)
    return FaceArrays(
        hr=rng.integers(0, 256, size=(n, 128, 128, 3), dtype=np.uint8), lr=None,
        landmarks=np.repeat(TEMPLATE[None], n, 0), identity=np.arange(n) % ids,
        identity_names=[str(i) for i in range(ids)], split=np.array(["train"] * n), face_ids=np.arange(n).astype(str),
        source="random")


def time_loop(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    """Steps per second of ``step_fn(i)`` after ``warmup`` untimed steps."""
    for i in range(warmup):
        step_fn(i)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    synchronize(device)
    return steps / (time.perf_counter() - t0)


def basicsr_style_steps(args, device, vgg: VGG19Features, batches):
    """Eager fp32 ESRGAN step following BasicSR's ESRGANModel.optimize_parameters."""
    torch.manual_seed(0)
    net_g = RRDBNet(nf=args.nf, nb=args.nb, gc=args.gc, upsampler=args.upsampler, bicubic_skip=args.bicubic_skip).to(device)
    net_d = VGGStyleDiscriminator(nf=64).to(device)
    vgg = copy.deepcopy(vgg).to(device)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=1e-4, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    bce = torch.nn.BCEWithLogitsLoss()

    def gan_step(i):
        lq, gt = batches(i)
        for p in net_d.parameters():
            p.requires_grad = False
        opt_g.zero_grad()
        output = net_g(lq)
        l_pix = 0.01 * F.l1_loss(output, gt)
        l_percep = 1.0 * F.l1_loss(vgg(output)[0], vgg(gt)[0].detach())
        real_d_pred = net_d(gt).detach()
        fake_g_pred = net_d(output)
        l_g_real = bce(real_d_pred - fake_g_pred.mean(), torch.zeros_like(real_d_pred))
        l_g_fake = bce(fake_g_pred - real_d_pred.mean(), torch.ones_like(fake_g_pred))
        l_g_gan = 0.005 * (l_g_real + l_g_fake) / 2
        (l_pix + l_percep + l_g_gan).backward()
        opt_g.step()
        for p in net_d.parameters():
            p.requires_grad = True
        opt_d.zero_grad()
        fake_d_pred = net_d(output).detach()
        real_d_pred = net_d(gt)
        l_d_real = bce(real_d_pred - fake_d_pred.mean(), torch.ones_like(real_d_pred)) * 0.5
        l_d_real.backward()
        fake_d_pred = net_d(output.detach())
        l_d_fake = bce(fake_d_pred - real_d_pred.detach().mean(), torch.zeros_like(fake_d_pred)) * 0.5
        l_d_fake.backward()
        opt_d.step()
        _ = {k: v.item() for k, v in {"l_pix": l_pix, "l_p": l_percep, "l_g": l_g_gan, "l_d": l_d_real + l_d_fake}.items()}

    def l1_step(i):
        lq, gt = batches(i)
        opt_g.zero_grad()
        l_pix = F.l1_loss(net_g(lq), gt)
        l_pix.backward()
        opt_g.step()
        _ = l_pix.item()

    return gan_step, l1_step


def l1_variant_step(args, device: torch.device, channels_last: bool, bf16: bool, compiled: bool):
    """A plain L1 + Adam step of the chosen RRDB under one speed option (random faces)."""
    torch.manual_seed(0)
    net = RRDBNet(nf=args.nf, nb=args.nb, gc=args.gc, upsampler=args.upsampler, bicubic_skip=args.bicubic_skip)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    forward = torch.compile(net) if compiled else net
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(args.batch_size, 3, 128, 128, generator=gen).to(device)
    lr = F.avg_pool2d(hr, 4).contiguous(memory_format=fmt)

    def step(i):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sr = forward(lr)
        loss = F.l1_loss(sr.float(), hr)
        loss.backward()
        opt.step()

    return step


def time_variants(args, device: torch.device) -> dict[str, float]:
    """it/s of the L1 step under each CPU speed option, printed with the speed-up over fp32 eager."""
    threads = torch.get_num_threads()
    variants = [("fp32 eager", False, False, False, threads), ("fp32 eager, 1 thread", False, False, False, 1),
                ("fp32 channels_last", True, False, False, threads), ("bf16 autocast", False, True, False, threads),
                ("bf16 autocast + channels_last", True, True, False, threads),
                ("fp32 torch.compile", False, False, True, threads),
                ("bf16 autocast + torch.compile", False, True, True, threads),
                ("bf16 autocast + channels_last + torch.compile", True, True, True, threads)]
    results: dict[str, float] = {}
    for name, channels_last, bf16, compiled, n_threads in variants:
        torch.set_num_threads(n_threads)
        try:
            step = l1_variant_step(args, device, channels_last, bf16, compiled)
            results[name] = time_loop(step, args.steps, args.warmup + (2 if compiled else 0), device)
        except Exception as exc:  # noqa: BLE001 - e.g. no C compiler for inductor
            print(f"{name}: failed ({str(exc).splitlines()[0][:120]})")
            continue
        finally:
            torch.set_num_threads(threads)
        base = results.get("fp32 eager", results[name])
        print(f"{name:46s} {results[name]:7.3f} it/s  {results[name] / base:5.2f}x fp32 eager")
    return results


def trainer_step_fn(trainer: SRTrainer, arrays: FaceArrays, cfg):
    """``step(i)``: one ``trainer.train_step`` on the i-th identity batch of ``arrays`` (on the
    trainer's device, flipped, channels_last as the trainer wants; past any L1 warm-up)."""
    batcher = FaceBatcher(arrays, np.arange(len(arrays)), trainer.device, flip=True, on_device=True,
                          channels_last=trainer.channels_last)
    sampler = IdentityBatchSampler(batcher.identity_np, cfg.train.batch_size, cfg.train.faces_per_identity)

    def step(i):
        trainer.train_step(batcher.make(*sampler.batch(i)), i + cfg.optim.warmup_l1_steps)

    return step


def recipe_step(config_file: str, precision: str, threads: int | None, arrays: FaceArrays):
    """The training step of the recipe in ``config_file`` under one precision (fp32 eager, or
    bf16 autocast with channels_last as fsr train runs it); random faces, weights as configured."""
    from fsr.train.loop import build_loss_networks

    overrides = [f"compute.precision={precision}", "compute.compile=false"]
    cfg = build_config(config_file=config_file, overrides=overrides).validate()
    compute = Compute.create("cpu", precision, cfg.train.batch_size, 0, threads, cpu_auto_bf16=True)
    trainer = SRTrainer(cfg, compute, build_loss_networks(cfg, compute, for_validation=False))
    return trainer_step_fn(trainer, arrays, cfg), cfg


def time_recipes(args, arrays: FaceArrays) -> dict[str, float]:
    """it/s of each --recipe step in fp32 eager and bf16 + channels_last, with the speed-up."""
    results: dict[str, float] = {}
    for config_file in args.recipe:
        base = None
        for precision, label in (("fp32", "fp32 eager"), ("bf16", "bf16 autocast + channels_last")):
            step, cfg = recipe_step(config_file, precision, args.threads or None, arrays)
            speed = time_loop(step, args.steps, args.warmup, torch.device("cpu"))
            results[f"recipe {config_file} {label}"] = speed
            base = base or speed
            m = cfg.model
            print(f"{config_file} (RRDB nf={m.nf} nb={m.nb}, gan={cfg.loss.gan}, identity={cfg.loss.identity}, "
                  f"perceptual={cfg.loss.perceptual_net}, batch {cfg.train.batch_size}) {label:30s} "
                  f"{speed:6.3f} it/s  {speed / base:5.2f}x fp32 eager", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compute_arguments(parser, batch_size=16, batch_help="faces per training batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nf", type=int, default=64)
    parser.add_argument("--nb", type=int, default=23)
    parser.add_argument("--gc", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile in the fsr step")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (reduce-overhead)")
    parser.add_argument("--vgg-weights", default="", help="torchvision VGG19 checkpoint (random weights if absent)")
    parser.add_argument("--id-model", default="dlib")
    parser.add_argument("--id-weights", default="")
    parser.add_argument("--upsampler", default="nearest", help="RRDB upsampler: nearest | pixelshuffle")
    parser.add_argument("--bicubic-skip", action="store_true", help="RRDB learns the residual over bicubic")
    parser.add_argument("--perceptual", default="vgg", choices=("vgg", "identity"),
                        help="φ of Eq. 6 in the fsr full step (identity: also timed with two identity passes)")
    parser.add_argument("--recipe", action="append", default=[], metavar="CONFIG",
                        help="time this training config's step in fp32 eager and in bf16 + channels_last (repeatable)")
    parser.add_argument("--variants", action="store_true", help="time the L1 step under each CPU speed option")
    parser.add_argument("--skip-fsr", action="store_true", help="skip the fsr full and L1 trainer steps")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()

    # as fsr train resolves it: --precision auto means bf16 on a CPU with native bf16
    compute = Compute.create(args.device, args.precision, args.batch_size, 0, args.threads or None, cpu_auto_bf16=True)
    device = compute.device
    print(f"machine: {machine_description()}")
    print(f"device: {compute.describe()}; batch {args.batch_size}; RRDB nf={args.nf} nb={args.nb} gc={args.gc}")
    vgg = (VGG19Features.from_checkpoint(args.vgg_weights) if args.vgg_weights else VGG19Features(("conv5_4",)))
    identity = None
    try:
        from fsr.models.face import create_face_model

        identity = IdentityFeatures(create_face_model(args.id_model, weights=args.id_weights or None, compute=compute))
    except Exception as exc:  # noqa: BLE001
        print(f"warning: identity network unavailable, fsr full step runs without Eq. 5: {exc}")

    arrays = random_faces(256, 64)
    results: dict[str, float] = {}
    if args.variants:
        print(f"L1 step of RRDB nf={args.nf} nb={args.nb} gc={args.gc} upsampler={args.upsampler} "
              f"bicubic_skip={args.bicubic_skip}, batch {args.batch_size}, {torch.get_num_threads()} threads:")
        results.update({f"variant {k}": v for k, v in time_variants(args, device).items()})
    if args.recipe:
        results.update(time_recipes(args, arrays))

    if not args.skip_baseline:
        plain = FaceBatcher(arrays, np.arange(len(arrays)), device, flip=False, on_device=True)
        sampler = IdentityBatchSampler(plain.identity_np, args.batch_size)

        def batches(i):
            b = plain.make(*sampler.batch(i))
            return b.lr, b.hr

        gan_step, l1_step = basicsr_style_steps(args, device, vgg, batches)
        results["baseline_gan_fp32_eager"] = time_loop(gan_step, args.steps, args.warmup, device)
        print(f"baseline GAN step (BasicSR-style, fp32 eager): {results['baseline_gan_fp32_eager']:.3g} it/s")
        results["baseline_l1_fp32_eager"] = time_loop(l1_step, args.steps, args.warmup, device)
        print(f"baseline L1 step  (fp32 eager):                 {results['baseline_l1_fp32_eager']:.2f} it/s")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def fsr_trainer(preset_overrides: list[str], with_identity: bool, perceptual: str) -> tuple[SRTrainer, callable]:
        overrides = [f"model.nf={args.nf}", f"model.nb={args.nb}", f"model.gc={args.gc}",
                     f"train.batch_size={args.batch_size}", f"compute.compile={args.compile}",
                     f"compute.cuda_graphs={args.cuda_graphs}", f"model.upsampler={args.upsampler}",
                     f"model.bicubic_skip={str(args.bicubic_skip).lower()}", *preset_overrides]
        cfg = build_config("ipfsrgan", overrides=overrides)
        phi = None
        if perceptual == "vgg":
            phi = PerceptualFeatures("vgg", copy.deepcopy(vgg))
        elif perceptual == "identity":
            phi = PerceptualFeatures("identity", identity)
        losses = LossNetworks(identity=identity if with_identity else None, perceptual=phi)
        trainer = SRTrainer(cfg, compute, losses)
        return trainer, trainer_step_fn(trainer, arrays, cfg)

    if args.skip_fsr:
        _write_json(args, compute, results)
        return
    if args.perceptual == "identity" and identity is None:
        parser.error("--perceptual identity needs the identity network")
    trainer, full = fsr_trainer(["loss.weights=paper", f"loss.perceptual_net={args.perceptual}"]
                                + ([] if identity is not None else ["loss.identity=0"]),
                                identity is not None, args.perceptual)
    phi_name = "VGG" if args.perceptual == "vgg" else "identity features"
    label = (f"fsr full step (G + D + {phi_name} + identity + L1)" if identity is not None
             else "fsr full step (G + D + VGG + L1; no identity net)")
    results["fsr_full"] = time_loop(full, args.steps, args.warmup, device)
    print(f"{label}, {precision_name(compute.dtype)}: {results['fsr_full']:.3g} it/s")
    if trainer.shared_identity_pass:
        trainer.shared_identity_pass = False
        results["fsr_full_two_identity_passes"] = time_loop(full, args.steps, args.warmup, device)
        print(f"  the same with two identity passes (embedding, features): "
              f"{results['fsr_full_two_identity_passes']:.3g} it/s")
    del full, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _, l1 = fsr_trainer(["loss.gan=none", "loss.identity=0", "loss.perceptual_net=none"], False, "none")
    results["fsr_l1"] = time_loop(l1, args.steps, args.warmup, device)
    print(f"fsr L1 step, {precision_name(compute.dtype)}: {results['fsr_l1']:.3g} it/s")
    if "baseline_gan_fp32_eager" in results:
        print(f"speed-up full step vs baseline GAN: {results['fsr_full'] / results['baseline_gan_fp32_eager']:.2f}x; "
              f"L1: {results['fsr_l1'] / results['baseline_l1_fp32_eager']:.2f}x")
    _write_json(args, compute, results)


def _write_json(args, compute: Compute, results: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_description(), "device": compute.describe(),
                                               "args": vars(args), "it_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
