"""RRDB generator of ESRGAN, as used by IP-FSRGAN (Sec. III-A; nf=64, gc=32, 23 blocks).

State-dict keys follow BasicSR's ``RRDBNet`` (conv_first, body.N.rdbK.convM, conv_body,
conv_up1, conv_up2, conv_hr, conv_last), so published ESRGAN / Real-ESRGAN x4 RRDB
weights load directly for initialisation and comparison.

Input: (N, 3, h, w) RGB in [0, 1]. Output: (N, 3, 4h, 4w), not clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsr.core.resize import resize_bicubic


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; output scaled by 0.2 and added to the input."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, residual scaling 0.2."""

    def __init__(self, nf: int = 64, gc: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator, x4.

    Args: nf feature channels, nb number of RRDB blocks, gc growth channels.
    upsampler: ``"nearest"`` (ESRGAN/BasicSR: two nearest-neighbour x2 + conv stages and two
    convs at full resolution; BasicSR key names) or ``"pixelshuffle"`` (one conv to
    ``out_ch * 16`` channels at LR resolution + PixelShuffle(4): all convs run at LR
    resolution, about 5x cheaper for small nf; keys ``conv_up_ps``).
    bicubic_skip: add the bicubic upsampling of the input to the output, so the network
    learns the residual over bicubic (VDSR-style; trains much faster from scratch). The
    bicubic is fsr's one antialiased bicubic (``fsr.data.degrade``), as the 'bicubic' system.
    """

    scale = 4

    def __init__(
        self,
        in_ch: int = 3,
        out_ch: int = 3,
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
        upsampler: str = "nearest",
        bicubic_skip: bool = False,
    ) -> None:
        super().__init__()
        if upsampler not in ("nearest", "pixelshuffle"):
            raise ValueError(f"upsampler must be 'nearest' or 'pixelshuffle', got {upsampler!r}")
        self.arch_args = {"in_ch": in_ch, "out_ch": out_ch, "nf": nf, "nb": nb, "gc": gc}
        if upsampler != "nearest" or bicubic_skip:
            self.arch_args.update(upsampler=upsampler, bicubic_skip=bicubic_skip)
        self.upsampler = upsampler
        self.bicubic_skip = bicubic_skip
        self.conv_first = nn.Conv2d(in_ch, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        if upsampler == "nearest":
            self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_last = nn.Conv2d(nf, out_ch, 3, 1, 1)
        else:
            self.conv_up_ps = nn.Conv2d(nf, out_ch * 16, 3, 1, 1)
            if bicubic_skip:  # start as the identity over bicubic: residual branch begins near zero
                nn.init.zeros_(self.conv_up_ps.bias)
                self.conv_up_ps.weight.data.mul_(0.1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        if self.upsampler == "nearest":
            feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
            out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        else:
            out = F.pixel_shuffle(self.conv_up_ps(feat), 4)
        if self.bicubic_skip:
            out = out + resize_bicubic(x, (x.shape[-2] * 4, x.shape[-1] * 4)).to(out.dtype)
        return out


def rrdb_args_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Infer (in_ch, out_ch, nf, nb, gc) from a BasicSR-layout RRDBNet state dict."""
    nf, in_ch = state["conv_first.weight"].shape[:2]
    gc = state["body.0.rdb1.conv1.weight"].shape[0] if "body.0.rdb1.conv1.weight" in state else 32
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("body.")}
    if "conv_last.weight" in state:
        out_ch = state["conv_last.weight"].shape[0]
        return {"in_ch": int(in_ch), "out_ch": int(out_ch), "nf": int(nf), "nb": len(blocks), "gc": int(gc)}
    out_ch = state["conv_up_ps.weight"].shape[0] // 16
    return {"in_ch": int(in_ch), "out_ch": int(out_ch), "nf": int(nf), "nb": len(blocks), "gc": int(gc), "upsampler": "pixelshuffle"}


def deepen_rrdb_state(small: dict[str, torch.Tensor], deep: RRDBNet) -> dict[str, torch.Tensor]:
    """Weights for ``deep`` (more RRDB blocks) that compute exactly what ``small`` computes.

    Net2Net-style growth of the trunk: the trained blocks are kept, each new block is appended
    with the last conv of its three RDBs set to zero (so each RDB is the identity and the block
    multiplies its input by 1.2), and ``conv_body``'s weight is divided by 1.2 per new block to
    cancel that. Training then starts from the small model's output and only adds capacity.
    ``deep`` supplies the random initialisation of the new blocks' other convs; every other
    tensor must have the same shape in both models.
    """
    state = {k: v.clone() for k, v in deep.state_dict().items()}
    n_small, n_deep = rrdb_args_from_state_dict(small)["nb"], len(deep.body)
    if n_small > n_deep:
        raise ValueError(f"cannot deepen {n_small} RRDB blocks to {n_deep}")
    for key, value in small.items():
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"{key}: the two models differ beyond the number of RRDB blocks")
        state[key] = value.clone()
    for block in range(n_small, n_deep):
        for rdb in ("rdb1", "rdb2", "rdb3"):
            state[f"body.{block}.{rdb}.conv5.weight"].zero_()
            state[f"body.{block}.{rdb}.conv5.bias"].zero_()
    state["conv_body.weight"] = small["conv_body.weight"] / 1.2 ** (n_deep - n_small)
    return state


def _conv_channel_groups(key: str, args: dict[str, int]) -> tuple[list[int], list[int]]:
    """(output groups, input groups) of the conv named ``key`` in an RRDBNet with ``args``
    (in_ch, out_ch, nf, gc): the sizes of the concatenated feature maps that widening must keep apart."""
    nf, gc, out_ch = args["nf"], args["gc"], args["out_ch"]
    name = key.rsplit(".", 1)[0]
    if name.startswith("body."):
        k = int(name[-1])  # rdbN.convK
        return ([nf] if k == 5 else [gc]), [nf] + [gc] * (k - 1)
    return {
        "conv_first": ([nf], [args["in_ch"]]),
        "conv_body": ([nf], [nf]),
        "conv_up1": ([nf], [nf]),
        "conv_up2": ([nf], [nf]),
        "conv_hr": ([nf], [nf]),
        "conv_last": ([out_ch], [nf]),
        "conv_up_ps": ([out_ch * 16], [nf]),
    }[name]


def _old_channels(narrow: list[int], wide: list[int]) -> torch.Tensor:
    """Indices, in the wide concatenation, of the narrow one's channels (each group's first ones)."""
    starts = torch.tensor([0, *wide[:-1]]).cumsum(0)
    return torch.cat([torch.arange(n) + int(s) for n, s in zip(narrow, starts)])


def widen_rrdb_state(narrow: dict[str, torch.Tensor], wide: RRDBNet) -> dict[str, torch.Tensor]:
    """Weights for ``wide`` (more feature channels nf and/or growth channels gc, as many blocks)
    that compute exactly what ``narrow`` computes.

    Net2Net-style widening: every conv keeps its trained weights on the old channels; the
    weights *into* each new channel are zero (so the new feature maps start at zero everywhere
    and the output is unchanged), and the weights *from* new channels keep ``wide``'s random
    initialisation, so the first gradient step already reaches the zero weights and the new
    channels start to learn. Shapes: conv weights (out, in, 3, 3); the dense concatenations
    ``[x, x1, .., x4]`` of each RDB are widened group by group.
    """
    small_args, big_args = rrdb_args_from_state_dict(narrow), wide.arch_args
    if len(wide.body) != small_args["nb"]:
        raise ValueError(f"cannot widen {small_args['nb']} RRDB blocks into {len(wide.body)}: deepen separately")
    if big_args["nf"] < small_args["nf"] or big_args["gc"] < small_args["gc"]:
        raise ValueError(f"cannot narrow nf/gc {small_args['nf']}/{small_args['gc']} to {big_args['nf']}/{big_args['gc']}")
    state = {k: v.clone() for k, v in wide.state_dict().items()}
    if set(state) != set(narrow):
        raise ValueError("the two models differ beyond nf and gc")
    for key, value in narrow.items():
        groups_old, groups_new = _conv_channel_groups(key, small_args), _conv_channel_groups(key, big_args)
        rows = _old_channels(groups_old[0], groups_new[0])
        target = state[key]
        if key.endswith(".bias"):
            target.zero_()
            target[rows] = value
            continue
        cols = _old_channels(groups_old[1], groups_new[1])
        new_rows = torch.ones(target.shape[0], dtype=torch.bool)
        new_rows[rows] = False
        target[new_rows] = 0
        target[rows.unsqueeze(1), cols.unsqueeze(0)] = value
    return state
