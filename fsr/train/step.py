"""One training step of IP-FSRGAN and its baselines: networks, optimizers, EMA, Eq. 1.

:class:`SRTrainer` owns G (and D), their Adam optimizers and step-decay schedules, the EMA
copy of G, and the frozen loss networks; ``train_step(batch, step)`` runs one G update
(Eq. 1) and one D update (Eq. 4) and returns the detached loss terms (no host sync).
The same object is what ``benchmarks/train_step.py`` times.

Speed on GPUs: bf16 autocast, channels_last tensors and weights, fused Adam, optional
``torch.compile`` (``cuda_graphs``: mode ``reduce-overhead``, i.e. CUDA graphs), EMA by a
single ``torch._foreach_lerp_``, no ``.item()`` inside the step.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fsr.core.device import Compute
from fsr.core.resize import resize_bicubic
from fsr.data.dataset import FaceBatch
from fsr.models.discriminator import VGGStyleDiscriminator
from fsr.models.generators import build_generator
from fsr.models.phase import phase_means
from fsr.train.config import Config
from fsr.train.distributed import DistInfo, wrap_ddp
from fsr.train.losses import (
    GAN_LOSSES,
    IdentityFeatures,
    PerceptualFeatures,
    identity_loss,
    perceptual_loss,
    pixel_loss,
    same_identity_matrix,
)


@dataclass
class LossNetworks:
    """The frozen networks the losses need (None where a loss is off)."""

    identity: IdentityFeatures | None = None
    perceptual: PerceptualFeatures | None = None


class SRTrainer:
    """Networks, optimizers and the step function for one process."""

    def __init__(self, config: Config, compute: Compute, losses: LossNetworks, dist: DistInfo | None = None) -> None:
        self.config = config
        self.compute = compute
        self.device = compute.device
        self.dist = dist or DistInfo()
        self.weights = config.loss.resolved_weights()
        self.losses = losses
        self.on_gpu = self.device.type == "cuda"
        # channels_last pays on GPUs and for bf16 on a CPU (1.65x fp32 eager vs 1.58x for the 8-block
        # RRDB step, benchmarks/train_step.py --variants); fp32 on a CPU stays contiguous.
        cpu_bf16 = self.device.type == "cpu" and compute.dtype == torch.bfloat16
        self.channels_last = config.compute.channels_last and (self.on_gpu or cpu_bf16)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.generator = build_generator(config.model.arch, **config.model.generator_args()).to(self.device, memory_format=fmt)
        self.use_gan = config.loss.gan != "none" and self.weights.adversarial > 0
        self.discriminator = (
            VGGStyleDiscriminator(nf=config.model.d_nf).to(self.device, memory_format=fmt) if self.use_gan else None
        )
        self.d_input_size = self.discriminator.input_size if self.use_gan else 0
        self.ema = None
        if config.train.ema_decay > 0:
            self.ema = copy.deepcopy(self.generator).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        for net in (losses.identity, losses.perceptual):
            if net is not None:
                net.to(self.device, memory_format=fmt)

        fused = self.on_gpu and config.compute.fused_adam
        opt = config.optim
        adam = dict(betas=(opt.beta1, opt.beta2), **({"fused": True} if fused else {}))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=opt.lr_g, **adam)
        self.sched_g = torch.optim.lr_scheduler.StepLR(self.opt_g, step_size=opt.decay_every, gamma=opt.decay_factor)
        self.opt_d = self.sched_d = None
        if self.discriminator is not None:
            self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=opt.lr_d, **adam)
            self.sched_d = torch.optim.lr_scheduler.StepLR(self.opt_d, step_size=opt.decay_every, gamma=opt.decay_factor)
        self.g_loss_fn, self.d_loss_fn = GAN_LOSSES.get(config.loss.gan, GAN_LOSSES["ragan"])

        # wrappers used in the step (DDP, compile); the plain modules stay in self.generator etc.
        self.g_step = wrap_ddp(self.generator, self.device, self.dist)
        self.d_step = wrap_ddp(self.discriminator, self.device, self.dist) if self.discriminator is not None else None
        self.d_for_g = self.discriminator
        self.identity_net = losses.identity
        self.perceptual_net = losses.perceptual
        # identity features as φ (Eq. 6) and γ > 0 (Eq. 5): one pass of the identity network
        # gives both the embedding and the feature maps
        self.shared_identity_pass = (
            self.weights.identity > 0 and self.weights.perceptual > 0 and losses.identity is not None
            and losses.perceptual is not None and losses.perceptual.kind == "identity"
            and losses.perceptual.network is losses.identity
        )
        if config.compute.compile or config.compute.cuda_graphs:
            use_graphs = config.compute.cuda_graphs and self.on_gpu
            if use_graphs and self.dist.enabled:
                warnings.warn("CUDA graphs are not used with DDP (gradient all-reduce hooks); compiling without them",
                              stacklevel=2)
                use_graphs = False
            mode = "reduce-overhead" if use_graphs else "default"
            self.g_step = torch.compile(self.g_step, mode=mode)
            if self.d_step is not None:
                self.d_step = torch.compile(self.d_step, mode=mode)
                self.d_for_g = torch.compile(self.discriminator, mode=mode)
            if self.perceptual_net is not None:
                self.perceptual_net = torch.compile(self.perceptual_net)
        self._ema_pairs = None

    # --- step -------------------------------------------------------------------------------

    def train_step(self, batch: FaceBatch, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step (``step`` is 0-based). Returns detached loss terms on the device."""
        cfg = self.config
        w = self.weights
        warmup = step < cfg.optim.warmup_l1_steps
        logs: dict[str, torch.Tensor] = {}
        self.generator.train()
        self.opt_g.zero_grad(set_to_none=True)
        with self.compute.autocast():
            sr = self.g_step(batch.lr)
            if warmup:
                total = pixel_loss(sr, batch.hr, "l1")
                logs["l_pixel"] = total.detach()
            else:
                total = sr.new_zeros((), dtype=torch.float32)
                if w.pixel > 0:
                    l_pix = pixel_loss(sr, batch.hr, cfg.loss.pixel_criterion)
                    total = total + w.pixel * l_pix
                    logs["l_pixel"] = l_pix.detach()
                if cfg.loss.phase > 0 and sr.shape[-1] % 4 == 0 and sr.shape[-2] % 4 == 0:
                    # the batch's mean 4x4 pattern of SR - HR: a fixed grid no real face has
                    l_phase = phase_means(sr.float() - batch.hr.float()).square().mean()
                    total = total + cfg.loss.phase * l_phase
                    logs["l_phase"] = l_phase.detach()
                if w.perceptual > 0 and self.perceptual_net is not None:
                    if self.shared_identity_pass:  # the identity term below reuses emb_sr, emb_hr
                        emb_sr, feats_sr = self.identity_net.embed_and_features(sr, batch.landmarks)
                        with torch.no_grad():
                            emb_hr, feats_hr = self.identity_net.embed_and_features(batch.hr, batch.landmarks)
                    else:
                        feats_sr = self.perceptual_net(sr, batch.landmarks)
                        with torch.no_grad():
                            feats_hr = self.perceptual_net(batch.hr, batch.landmarks)
                    l_p = perceptual_loss(feats_sr, [f.detach() for f in feats_hr], cfg.loss.perceptual_criterion)
                    total = total + w.perceptual * l_p
                    logs["l_perceptual"] = l_p.detach()
                if w.identity > 0 and self.identity_net is not None:
                    if not self.shared_identity_pass:
                        emb_sr = self.identity_net.embed(sr, batch.landmarks)
                        with torch.no_grad():
                            emb_hr = self.identity_net.embed(batch.hr, batch.landmarks)
                    same = same_identity_matrix(batch.identity)
                    l_id, parts = identity_loss(emb_sr, emb_hr, same, cfg.loss.margin)
                    total = total + w.identity * l_id
                    logs["l_identity"] = l_id.detach()
                    logs.update(parts)
                if self.use_gan:
                    self.discriminator.requires_grad_(False)
                    fake_logits = self.d_for_g(self.discriminator_view(sr))
                    with torch.no_grad():
                        real_logits = self.d_for_g(self.discriminator_view(batch.hr))
                    l_adv = self.g_loss_fn(real_logits.float(), fake_logits.float())
                    total = total + w.adversarial * l_adv
                    logs["l_adv_g"] = l_adv.detach()
        total.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), cfg.optim.grad_clip)
        self.opt_g.step()
        logs["l_g_total"] = total.detach()

        if self.use_gan and not warmup:
            self.discriminator.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            with self.compute.autocast():
                real_logits = self.d_step(self.discriminator_view(batch.hr))
                fake_logits = self.d_step(self.discriminator_view(sr.detach()))
                l_d = self.d_loss_fn(real_logits.float(), fake_logits.float())
            l_d.backward()
            self.opt_d.step()
            logs["l_d"] = l_d.detach()
            logs["d_real"] = real_logits.detach().float().mean()
            logs["d_fake"] = fake_logits.detach().float().mean()
        self.sched_g.step()
        if self.sched_d is not None:  # D's schedule follows the global step, also while D rests (warm-up)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.sched_d.step()
        self.update_ema(step)
        return logs

    def discriminator_view(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) faces as the discriminator sees them: bicubic-resized to its input side
        (128) when the batch is smaller (``data.scale_augment`` shrinks whole batches). Real and
        fake faces go through the same resize, so it tells them apart by content alone."""
        return resize_bicubic(images, self.d_input_size)

    def ema_decay_at(self, step: int) -> float:
        """EMA decay after ``step`` + 1 updates: ``min(decay, (1 + n) / (10 + n))``.

        The warm-up (timm's ModelEmaV2 / Polyak averaging with a step-dependent decay) makes the
        average follow the early, fast-changing weights instead of staying near the random
        initialisation for ~1/(1 - decay) steps, so a short run never ends with a dead EMA copy.
        """
        n = step + 1
        decay = self.config.train.ema_decay
        return min(decay, (1.0 + n) / (10.0 + n)) if self.config.train.ema_warmup else decay

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """Move the EMA copy of G towards G by ``1 - ema_decay_at(step)`` (buffers are copied)."""
        if self.ema is None:
            return
        if self._ema_pairs is None:
            ema_p = [p for p in self.ema.parameters()]
            g_p = [p for p in self.generator.parameters()]
            ema_b = [b for b in self.ema.buffers() if b.dtype.is_floating_point]
            g_b = [b for b in self.generator.buffers() if b.dtype.is_floating_point]
            self._ema_pairs = (ema_p, g_p, ema_b, g_b)
        ema_p, g_p, ema_b, g_b = self._ema_pairs
        torch._foreach_lerp_(ema_p, g_p, 1.0 - self.ema_decay_at(step))
        if ema_b:
            torch._foreach_copy_(ema_b, g_b)

    def inference_generator(self) -> nn.Module:
        """The EMA copy when enabled, else G (what sample grids show)."""
        return self.ema if self.ema is not None else self.generator

    def candidate_generators(self) -> dict[str, nn.Module]:
        """The generators that validation compares: ``generator`` and, with EMA, ``generator_ema``."""
        out = {"generator": self.generator}
        if self.ema is not None:
            out["generator_ema"] = self.ema
        return out

    # --- state ------------------------------------------------------------------------------

    def model_states(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"generator": self.generator.state_dict()}
        if self.ema is not None:
            out["generator_ema"] = self.ema.state_dict()
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator.state_dict()
        return out

    def optimizer_state(self) -> dict:
        state = {"optimizer_g": self.opt_g.state_dict(), "scheduler_g": self.sched_g.state_dict()}
        if self.opt_d is not None:
            state["optimizer_d"] = self.opt_d.state_dict()
            state["scheduler_d"] = self.sched_d.state_dict()
        state["rng_torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load(self, models: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        """Restore from :meth:`model_states` + :meth:`optimizer_state` (a checkpoint)."""
        self.generator.load_state_dict(models["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(models.get("generator_ema", models["generator"]))
        if self.discriminator is not None:
            if "discriminator" not in models:
                raise ValueError("checkpoint has no discriminator but this configuration trains one")
            self.discriminator.load_state_dict(models["discriminator"])
            self.opt_d.load_state_dict(state["optimizer_d"])
            self.sched_d.load_state_dict(state["scheduler_d"])
        self.opt_g.load_state_dict(state["optimizer_g"])
        self.sched_g.load_state_dict(state["scheduler_g"])
        if "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and torch.cuda.is_available():
            try:
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            except (RuntimeError, IndexError):  # a different number of GPUs: not needed for exactness
                pass
        self._ema_pairs = None
