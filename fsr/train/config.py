"""Typed training configuration: dataclasses, presets, TOML/YAML/JSON files and ``--set`` overrides.

Resolution order (later wins): preset (``ipfsrgan`` | ``esrgan`` | ``srgan`` | ``srcnn``)
-> config file (TOML, YAML or JSON, same section names) -> command-line options -> ``--set
section.key=value`` overrides. The resolved config is saved as ``config.yaml`` in the run dir.

Every value passes through one converter, :func:`convert`, driven by the dataclass field's
annotation (resolved by ``typing.get_type_hints``): ``Literal[...]`` fields are the allowed
choices, so a choice is checked in one place whether it comes from a preset, a file, an
option, an override or a saved ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fsr.models.face import FaceModelName
from fsr.train.losses import LOSS_WEIGHT_PRESETS, LossWeights

PresetName = Literal["ipfsrgan", "esrgan", "srgan", "srcnn"]
LossWeightsPreset = Literal["paper", "public-code"]
Criterion = Literal["l1", "l2"]
PerceptualNet = Literal["vgg", "identity", "none"]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    """Generator (``arch``: rrdb | srresnet | srcnn) and discriminator sizes."""

    arch: Literal["rrdb", "srresnet", "srcnn"] = "rrdb"
    nf: int = 64          # rrdb/srresnet feature channels (srcnn: first layer width n1)
    nb: int = 23          # rrdb blocks / srresnet residual blocks
    gc: int = 32          # rrdb growth channels
    d_nf: int = 64        # discriminator base width (VGG-128: 64)
    init_weights: str = ""  # optional generator init: fsr export .safetensors or BasicSR .pth
    upsampler: Literal["nearest", "pixelshuffle"] = "nearest"  # rrdb: nearest (ESRGAN/BasicSR keys) | pixelshuffle (all convs at LR size)
    bicubic_skip: bool = False  # rrdb: learn the residual over the bicubic upsampling

    def generator_args(self) -> dict:
        if self.arch == "rrdb":
            args = {"nf": self.nf, "nb": self.nb, "gc": self.gc}
            if self.upsampler != "nearest" or self.bicubic_skip:
                args.update(upsampler=self.upsampler, bicubic_skip=self.bicubic_skip)
            return args
        if self.arch == "srresnet":
            return {"nf": self.nf, "nb": self.nb}
        if self.arch == "srcnn":
            return {"n1": self.nf, "n2": max(1, self.nf // 2)}
        raise ConfigError(f"model.arch: unknown generator '{self.arch}' (rrdb | srresnet | srcnn)")


@dataclass
class LossConfig:
    """Eq. 1 weights and the loss networks.

    ``weights`` names a preset (paper | public-code); any of adversarial/identity/perceptual/pixel
    set explicitly overrides the preset's value. ``perceptual_net``: vgg (VGG19 from
    ``vgg_weights``) | identity (the identity network's features) | none.
    """

    weights: LossWeightsPreset = "paper"
    adversarial: float | None = None
    identity: float | None = None
    perceptual: float | None = None
    pixel: float | None = None
    gan: Literal["ragan", "vanilla", "none"] = "ragan"            # ragan (Eqs. 2-4) | vanilla (SRGAN) | none
    margin: float = 0.0              # m of Eq. 5
    phase: float = 0.0               # weight of the sub-pixel pattern penalty (fsr.models.phase); 0 = off
    perceptual_net: PerceptualNet = "vgg"
    perceptual_layers: list[str] = field(default_factory=lambda: ["conv5_4"])
    perceptual_criterion: Criterion = "l2"  # Eq. 6 squared L2; l1 = public code / ESRGAN
    pixel_criterion: Criterion = "l1"       # Eq. 7 L1; l2 = SRCNN's MSE
    id_model: FaceModelName = "dlib"       # face model of fsr.models.face (dlib | lightcnn | sphereface)
    id_weights: str = ""              # checkpoint for lightcnn/sphereface (dlib ships)
    vgg_weights: str = ""             # torchvision VGG19 state dict (vgg19-dcbb9e9d.pth)

    def resolved_weights(self) -> LossWeights:
        """λ, γ, η, ξ of Eq. 1: the preset's, overridden by explicit values; 0 for a disabled term."""
        base = LOSS_WEIGHT_PRESETS[self.weights]
        explicit = {name: float(getattr(self, name)) for name in ("adversarial", "identity", "perceptual", "pixel")
                    if getattr(self, name) is not None}
        weights = dataclasses.replace(base, **explicit)
        if self.gan == "none":
            weights = dataclasses.replace(weights, adversarial=0.0)
        if self.perceptual_net == "none":
            weights = dataclasses.replace(weights, perceptual=0.0)
        return weights


@dataclass
class OptimConfig:
    """Adam(β1, β2), lr 2e-4, step decay: lr × decay_factor every decay_every steps."""

    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    decay_factor: float = 0.7        # the paper's "decayed as 70%": x0.7 (ambiguous; configurable)
    decay_every: int = 200_000
    warmup_l1_steps: int = 0         # optional L1-only pre-training steps (0 in the paper)
    grad_clip: float = 0.0           # 0 = off


@dataclass
class TrainConfig:
    """Schedule, batching, EMA, validation, checkpointing and logging."""

    steps: int = 500_000
    batch_size: int = 16             # per process
    faces_per_identity: int = 2      # each batch is batch_size/faces_per_identity identities
    seed: int = 0
    ema_decay: float = 0.999         # 0 = no EMA
    ema_warmup: bool = True          # decay min(ema_decay, (1+n)/(10+n)) after n updates
    val_every: int = 5000
    val_faces: int = 256
    best_metric: Literal["psnr", "ssim", "identity"] = "psnr"      # psnr | ssim | identity
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 100
    sample_every: int = 5000
    progress: bool = True


@dataclass
class DataConfig:
    """Where LR faces come from and how batches are made."""

    lr_source: Literal["bicubic", "disk"] = "bicubic"     # bicubic (made on the device by fsr.data.degrade) | disk
    flip: bool = True                # random horizontal flips (HR, LR and landmarks together)
    on_device: bool = True           # keep all crops (uint8) on the device: no host->device copies
    val_split: str = "val"           # manifest split used for validation
    val_fraction: float = 0.05       # identities held out when the manifest has no val split
    max_faces: int = 0               # 0 = all training faces
    alpha_augment: float = 0.0       # fraction of training LR faces further degraded by a random alpha (Sec. V)
    alpha_min: float = 0.1           # smallest alpha drawn: LR side round(32 alpha) uniform in [round(32 alpha_min), 31]
    scale_augment: float = 0.0       # fraction of batches whose faces are shrunk before the LR is made
    scale_min: float = 0.5           # smallest shrink: HR side uniform in [128 scale_min, 128], step 4
    jpeg_augment: float = 0.0        # fraction of training LR faces JPEG-compressed (as faces cut from JPEG photos)
    jpeg_quality_min: int = 30       # JPEG quality drawn uniformly from [jpeg_quality_min, jpeg_quality_max]
    jpeg_quality_max: int = 95


@dataclass
class ComputeConfig:
    """Device, precision and speed switches."""

    device: str = "auto"
    precision: str = "auto"          # auto = bf16 on GPUs and on CPUs with native bf16, else fp32
    threads: int = 0
    channels_last: bool = True       # GPU, and bf16 on a CPU
    fused_adam: bool = True          # GPU only
    compile: bool = False            # torch.compile G and D
    cuda_graphs: bool = False        # compile mode reduce-overhead (CUDA graphs); implies compile
    deterministic: bool = False      # deterministic algorithms (exact resume on CPU)


@dataclass
class Config:
    """The whole training configuration."""

    preset: PresetName = "ipfsrgan"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "Config":
        """Check every field's type and choices (:func:`convert`) and the ranges; returns self."""
        for section in fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                apply_mapping(self, {section.name: asdict(value)}, "config")
        convert(self.preset, _hints(Config)["preset"], "preset")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2 (Eq. 5 needs pairs)")
        if not 0.0 <= self.data.alpha_augment <= 1.0:
            raise ConfigError(f"data.alpha_augment must be in [0, 1], got {self.data.alpha_augment}")
        if not 0.0 <= self.data.scale_augment <= 1.0 or not 0.0 < self.data.scale_min <= 1.0:
            raise ConfigError("data.scale_augment must be in [0, 1] and data.scale_min in (0, 1]")
        if not 0.0 < self.data.alpha_min < 1.0:
            raise ConfigError(f"data.alpha_min must be in (0, 1), got {self.data.alpha_min}")
        if not 0.0 <= self.data.jpeg_augment <= 1.0:
            raise ConfigError(f"data.jpeg_augment must be in [0, 1], got {self.data.jpeg_augment}")
        if not 1 <= self.data.jpeg_quality_min <= self.data.jpeg_quality_max <= 100:
            raise ConfigError("data.jpeg_quality_min and data.jpeg_quality_max must satisfy 1 <= min <= max <= 100, got "
                              f"{self.data.jpeg_quality_min} and {self.data.jpeg_quality_max}")
        if self.train.faces_per_identity < 1:
            raise ConfigError("train.faces_per_identity must be >= 1")
        return self


PRESETS: dict[str, dict] = {
    # IP-FSRGAN (the paper): RRDB + VGG-128 D, RaGAN + identity + perceptual + L1, paper weights.
    "ipfsrgan": {},
    # ESRGAN = IP-FSRGAN without the identity loss (Table 1).
    "esrgan": {"loss": {"identity": 0.0}},
    # SRGAN: SRResNet generator, standard GAN, VGG perceptual, no identity loss.
    "srgan": {"model": {"arch": "srresnet", "nf": 64, "nb": 16},
              "loss": {"gan": "vanilla", "identity": 0.0, "adversarial": 0.001, "perceptual": 1.0, "pixel": 0.0}},
    # SRCNN: pixel MSE only, on the bicubic-upsampled input.
    "srcnn": {"model": {"arch": "srcnn", "nf": 64},
              "loss": {"gan": "none", "identity": 0.0, "perceptual_net": "none", "pixel": 1.0, "pixel_criterion": "l2"},
              "train": {"ema_decay": 0.0}},
}


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _convert_scalar(value, annotation: type):
    """bool / int / float / str from a parsed value or a string; ValueError or TypeError if it does not fit."""
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(value)
            return value.lower() in TRUE_WORDS
        return bool(value)
    if annotation is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(float(value)) if isinstance(value, str) else int(value)
    if annotation is float:
        return float(value)
    if annotation is str:
        return "" if value is None else str(value)
    return value


def convert(value, annotation, where: str):
    """Convert a parsed value to a field's type (from ``typing.get_type_hints``).

    ``X | None`` keeps None; ``list[X]`` also takes a comma-separated string; ``Literal[...]``
    checks the value is one of the choices. Raises :class:`ConfigError` naming ``where``.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return convert(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{value}' is not one of {' | '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [convert(v, args[0] if args else str, where) for v in value]
    try:
        return _convert_scalar(value, annotation)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {annotation.__name__}") from None


def _hints(cls: type) -> dict:
    """Field name -> resolved annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def apply_mapping(config: Config, mapping: dict, source: str) -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping (from a file or preset) onto ``config``."""
    for section, values in mapping.items():
        if section == "preset":
            continue
        if not hasattr(config, section) or not dataclasses.is_dataclass(getattr(config, section)):
            raise ConfigError(f"{source}: unknown config section '{section}'")
        target = getattr(config, section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a table/mapping")
        hints = _hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(hints)})")
            setattr(target, key, convert(value, hints[key], f"{source}: {section}.{key}"))
    return config


OVERRIDE_ALIASES = {"train.lr": ("optim.lr_g", "optim.lr_d"), "optim.lr": ("optim.lr_g", "optim.lr_d")}


def apply_override(config: Config, override: str) -> Config:
    """Apply one ``section.key=value`` override (value parsed as YAML: numbers, bools, lists)."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.lr=1e-4")
    path, raw = override.split("=", 1)
    path = path.strip()
    if path in OVERRIDE_ALIASES:
        for target in OVERRIDE_ALIASES[path]:
            apply_override(config, f"{target}={raw}")
        return config
    section, key = path.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and not raw.strip().startswith(("'", '"')):
        value = raw.strip()
    return apply_mapping(config, {section: {key: value}}, f"--set {override}")


CONFIG_READERS = {
    ".toml": tomllib.loads,
    ".yaml": lambda text: yaml.safe_load(text) or {},
    ".yml": lambda text: yaml.safe_load(text) or {},
    ".json": json.loads,
}


def load_config_file(path: str | Path) -> dict:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) config file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    reader = CONFIG_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"{path}: unknown config format (use {' | '.join(CONFIG_READERS)})")
    try:
        data = reader(path.read_text())
    except Exception as exc:  # noqa: BLE001 (each reader raises its own parse error)
        raise ConfigError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    return data


def merge_options(config: Config, options: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Apply command-line ``options`` (``{"train.steps": 10}``; None values skipped), then
    ``--set section.key=value`` ``overrides``, onto ``config``; validate and return it.

    The one merge path of a fresh run (:func:`build_config`) and a resumed one (its saved config).
    """
    for dotted, value in (options or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            apply_mapping(config, {section: {key: value}}, f"option {dotted}")
    for override in overrides or []:
        apply_override(config, override)
    return config.validate()


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 options: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a :class:`Config`: preset -> file -> options ``{"train.steps": 10}`` -> ``--set`` overrides."""
    file_data = load_config_file(config_file) if config_file else {}
    preset = convert(preset or file_data.get("preset") or "ipfsrgan", _hints(Config)["preset"], "preset")
    config = Config(preset=preset)
    apply_mapping(config, PRESETS[preset], f"preset {preset}")
    apply_mapping(config, file_data, str(config_file))
    return merge_options(config, options, overrides)


def config_from_dict(data: dict) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a saved config.yaml)."""
    config = Config(preset=convert(data.get("preset", "ipfsrgan"), _hints(Config)["preset"], "saved config: preset"))
    apply_mapping(config, data, "saved config")
    return config.validate()


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (saved in the run dir)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
