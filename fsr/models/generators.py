"""Generator architectures by name, so checkpoints and model cards can say which to build.

Add a generator by putting its class in ``GENERATORS``; its constructor's keyword
arguments are what a model card stores as ``arch_args``.
"""

from __future__ import annotations

from torch import nn

from fsr.models.baselines import SRCNN, SRResNet
from fsr.models.rrdb import RRDBNet

GENERATORS: dict[str, type[nn.Module]] = {
    "rrdb": RRDBNet,
    "srresnet": SRResNet,
    "srcnn": SRCNN,
}


def build_generator(architecture: str, **arch_args) -> nn.Module:
    """Instantiate a generator by name (``rrdb``, ...) with its constructor arguments."""
    try:
        cls = GENERATORS[architecture]
    except KeyError:
        raise ValueError(f"unknown generator architecture '{architecture}' (known: {', '.join(sorted(GENERATORS))})") from None
    return cls(**arch_args)
