"""MTCNN face detector (Zhang et al. 2016) in PyTorch: P-, R- and O-Net and the cascade.

The cascade follows facenet-pytorch 2.6's ``detect_face`` step by step, so that its
boxes and landmarks agree with that implementation (tests/test_mtcnn.py checks it
against ``reference/mtcnn_reference.json``):

1. image pyramid: scales ``12/min_face * factor**k`` while ``min(h, w) * scale >= 12``;
   each level is an area ("adaptive average pool") resize to ``int(h*s+1) x int(w*s+1)``;
2. PNet on every level, candidates where P(face) >= t0, NMS 0.5 per level and image,
   NMS 0.7 per image over all levels, box regression without +1, squaring (``rerec``);
3. RNet on 24x24 area-resized crops of the candidate boxes *clipped to the image*,
   P(face) > t1, NMS 0.7, box regression (+1 widths), squaring;
4. ONet on 48x48 crops: P(face) > t2, 5 landmarks, box regression, then a greedy
   "Min" NMS (intersection over the smaller area, +1 areas) at 0.7.

NMS in steps 2-3 is torchvision's compiled kernel (areas without +1), loaded without importing
torchvision (``batched_nms``). Inputs are RGB in [0, 255], normalised ``(x - 127.5) / 128``.

Batching: images of equal size share PNet passes; the crops of all images (any size)
share RNet/ONet passes, so one call with many images keeps a GPU busy. The nets run
in float32 whatever the compute precision (box regression needs it; the nets are
small). The pyramid levels and the crops are area-resized by one vectorised gather from
summed-area tables of the images (OpenCV's ``integral`` on a CPU; exact integer sums,
identical in value to ``F.interpolate(mode="area")``), so no pass touches every pixel
of every level.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

from fsr.core.device import Compute
from fsr.core.weights import WeightsError, find_weights, load_safetensors, shipped_checksums

WEIGHTS_FILE = "mtcnn.safetensors"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class PNet(nn.Module):
    """Proposal net: (N, 3, H, W) normalised -> (reg (N, 4, h, w), prob (N, 2, h, w)), h = ceil((H-2)/2) - 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)  # box regression

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement net: (N, 3, 24, 24) -> (reg (N, 4), prob (N, 2))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).flatten(1)  # Keras flattens (W, H, C)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net: (N, 3, 48, 48) -> (reg (N, 4), landmarks (N, 10) = x1..x5, y1..y5 in [0, 1] of the box, prob (N, 2))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


@dataclass
class FaceDetections:
    """The faces found in one image, most confident first.

    boxes: (K, 4) float32 x1, y1, x2, y2 in image pixels; scores: (K,) float32 P(face);
    landmarks: (K, 5, 2) float32 x, y: left eye, right eye, nose, mouth left, mouth right.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> "FaceDetections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


# ----------------------------------------------------------------------------- cascade helpers


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list[float]:
    """Scales of the image pyramid (facenet-pytorch's loop, in Python floats)."""
    scale = 12.0 / min_face
    min_length = min(height, width) * scale
    scales = []
    while min_length >= 12:
        scales.append(scale)
        scale *= factor
        min_length *= factor
    return scales


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """``rerec``: (K, >=4) boxes -> squares of side max(w, h) on the same centre (w = x2 - x1)."""
    boxes = boxes.clone()
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """``bbreg``: apply (K, 4) offsets scaled by w = x2 - x1 + 1, h = y2 - y1 + 1."""
    boxes = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, 0] = boxes[:, 0] + reg[:, 0] * w
    boxes[:, 1] = boxes[:, 1] + reg[:, 1] * h
    boxes[:, 2] = boxes[:, 2] + reg[:, 2] * w
    boxes[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return boxes


#: Box coordinates (4 per box) above which NMS runs image by image rather than in one pass with
#: offsets, on a CPU and elsewhere (torchvision's thresholds).
_PER_IMAGE_NMS_ABOVE = {"cpu": 4000, "other": 100_000}


@functools.cache
def _nms_kernel() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """torchvision's compiled NMS (``torchvision::nms``), loaded without importing torchvision.

    ``import torchvision`` imports its models and, through them, ``torch._dynamo``: about 1.5 s of
    every detecting command's start on a 2-core CPU, for one kernel. The kernel's library is
    loaded the way torchvision's own ``extension`` module loads it; where that fails (another
    layout), torchvision is imported after all. Either way the same kernel runs.
    """
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for name in ("_C_stable", "_C"):
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                library = Path(folder) / f"{name}{suffix}"
                if library.is_file():
                    try:
                        torch.ops.load_library(str(library))
                        return torch.ops.torchvision.nms
                    except (OSError, RuntimeError, AttributeError):
                        pass
    from torchvision.ops import nms

    return nms


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each image, as ``torchvision.ops.batched_nms``: indices kept, by falling score.

    boxes: (N, 4) x1, y1, x2, y2 (areas without +1); scores: (N,); idxs: (N,) image of each box.
    Many boxes go image by image; fewer are shifted apart per image and suppressed in one pass.
    """
    nms = _nms_kernel()
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= _PER_IMAGE_NMS_ABOVE["cpu" if boxes.device.type == "cpu" else "other"]:
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for image in torch.unique(idxs):
        members = torch.where(idxs == image)[0]
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept_indices = torch.where(kept)[0]
    return kept_indices[scores[kept_indices].sort(descending=True)[1]]


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's final greedy NMS: overlap = intersection / smaller area, +1 areas.

    Keeps a box when its overlap with every kept, more confident box is <= threshold.
    Returns kept indices in pick order (descending score).
    """
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    picks = []
    while order.size > 0:
        i = order[-1]
        picks.append(int(i))
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = (w * h) / np.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(picks, dtype=np.int64)


class _IntegralImages:
    """Summed-area tables of a list of (3, H, W) uint8 images, in one (pixels, 3) buffer.

    ``crops(image_index, y0, y1, x0, x1, size)`` area-resizes the pixel rectangles rows
    [y0, y1) x cols [x0, x1) to (K, 3, size, size) float32 in [0, 255] (channels-last
    memory), exactly as ``F.interpolate(crop, (size, size), mode="area")`` (adaptive
    average pooling) would: integer sums over the same bins, divided by the bin area.
    """

    def __init__(self, groups: Sequence[tuple[torch.Tensor, list[int]]], n_images: int, device: torch.device) -> None:
        """groups: (B, 3, H, W) uint8 batches of equal-size images and their image indices."""
        tables = []
        bases = [0] * n_images
        heights = [0] * n_images
        widths = [0] * n_images
        offset = 0
        big = any(batch.shape[2] * batch.shape[3] * 255 >= 2**31 - 1 for batch, _ in groups)
        dtype = torch.int64 if big else torch.int32
        for batch, members in groups:
            b, _, h, w = batch.shape
            table = torch.zeros((b, h + 1, w + 1, 3), dtype=dtype, device=device)
            pixels = batch.permute(0, 2, 3, 1)
            if device.type == "cpu" and not big:  # OpenCV's integral is ~10x faster than two cumsums
                table_np = table.numpy()
                pixels_np = pixels.numpy()
                for j in range(b):
                    table_np[j] = cv2.integral(np.ascontiguousarray(pixels_np[j]), sdepth=cv2.CV_32S)
            elif device.type == "cpu":
                sums = np.cumsum(np.cumsum(pixels.numpy(), axis=1, dtype=np.int64), axis=2, dtype=np.int64)
                table[:, 1:, 1:] = torch.from_numpy(sums)
            else:
                table[:, 1:, 1:] = pixels.cumsum(1).cumsum(2)  # int64 sums, stored as int32 when they fit
            tables.append(table.reshape(-1, 3))
            for j, i in enumerate(members):
                bases[i] = offset + j * (h + 1) * (w + 1)
                heights[i], widths[i] = h, w
            offset += b * (h + 1) * (w + 1)
        self.table = torch.cat(tables) if tables else torch.zeros((0, 3), dtype=dtype, device=device)
        self.base = torch.tensor(bases, dtype=torch.int64, device=device)
        self.height = torch.tensor(heights, dtype=torch.int64, device=device)
        self.width = torch.tensor(widths, dtype=torch.int64, device=device)
        self.device = device

    def crops(
        self, image_index: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor,
        size: int, chunk: int = 4096,
    ) -> torch.Tensor:
        out = []
        for start in range(0, image_index.shape[0], chunk):
            sl = slice(start, start + chunk)
            out.append(self._crops(image_index[sl], y0[sl], y1[sl], x0[sl], x1[sl], size))
        if not out:
            return torch.zeros((0, 3, size, size), device=self.device)
        return torch.cat(out).permute(0, 3, 1, 2)  # (K, 3, S, S), channels-last memory

    def resize_whole(self, image_index: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        """Area-resize whole images (all of equal size) to (B, 3, out_h, out_w) float32 [0, 255].

        Identical in value to ``F.interpolate(images.float(), (out_h, out_w), mode="area")``
        (integer bin sums, one float division), from the tables already built: the pyramid
        levels of stage 1 cost a gather instead of an average pool over every pixel.
        """
        zeros = torch.zeros_like(image_index)
        h, w = self.height[image_index], self.width[image_index]
        return self._crops(image_index, zeros, h, zeros, w, out_h, out_w).permute(0, 3, 1, 2)

    def _crops(self, idx, y0, y1, x0, x1, size, size_w=None):
        size_h, size_w = size, size if size_w is None else size_w
        steps_h = torch.arange(size_h, device=self.device, dtype=torch.int64)
        steps_w = torch.arange(size_w, device=self.device, dtype=torch.int64)
        hc = (y1 - y0)[:, None]
        wc = (x1 - x0)[:, None]
        # adaptive pooling bins: [floor(i*n/s), ceil((i+1)*n/s))
        row_start = y0[:, None] + (steps_h * hc) // size_h
        row_end = y0[:, None] - ((-(steps_h + 1) * hc) // size_h)
        col_start = x0[:, None] + (steps_w * wc) // size_w
        col_end = x0[:, None] - ((-(steps_w + 1) * wc) // size_w)
        stride = self.width[idx] + 1  # (K,)
        # one gather of the table at all (start|end rows) x (start|end cols): (K, 2S, 2S, 3)
        rows = self.base[idx][:, None] + torch.cat([row_start, row_end], dim=1) * stride[:, None]
        cols = torch.cat([col_start, col_end], dim=1)
        table = self.table[rows[:, :, None] + cols[:, None, :]]
        sh, sw = size_h, size_w
        sums = table[:, sh:, sw:] - table[:, :sh, sw:] - table[:, sh:, :sw] + table[:, :sh, :sw]
        area = (row_end - row_start).to(torch.float32)[:, :, None, None] * (col_end - col_start).to(torch.float32)[:, None, :, None]
        return sums.to(torch.float32) / area


def _clip_for_crop(boxes: torch.Tensor, width: torch.Tensor, height: torch.Tensor):
    """facenet-pytorch's ``pad``: truncate to int, clip to 1..w / 1..h; crop = rows [y-1, ey), cols [x-1, ex)."""
    b = boxes[:, :4].trunc().to(torch.int64)
    x = b[:, 0].clamp(min=1)
    y = b[:, 1].clamp(min=1)
    ex = torch.minimum(b[:, 2], width)
    ey = torch.minimum(b[:, 3], height)
    valid = (ey > y - 1) & (ex > x - 1)
    return y - 1, ey, x - 1, ex, valid


class MTCNN(nn.Module):
    """The three nets and the cascade. Build with :meth:`MTCNN.load`; call :meth:`detect`."""

    def __init__(self) -> None:
        super().__init__()
        self.pnet = PNet()
        self.rnet = RNet()
        self.onet = ONet()
        self.eval()
        self.requires_grad_(False)
        # Work per forward pass. On a CPU small passes keep activations in cache
        # (measured 1.7-2.8x faster than one big pass); a GPU wants big ones.
        self.pnet_pixels = 1 << 18  # input pixels per PNet pass (CPU)
        self.pyramid_pixels = 1 << 20  # source pixels per PNet pyramid pass (CPU)
        self.rnet_batch = 256  # crops per RNet pass
        self.onet_batch = 48  # crops per ONet pass
        self.crop_chunk = 4096  # crops per summed-area gather

    @classmethod
    def load(cls, compute: Compute | None = None, weights: str | Path | None = None) -> "MTCNN":
        """Load ``weights/mtcnn.safetensors`` (SHA-256 checked) onto ``compute.device``."""
        path = find_weights(WEIGHTS_FILE, weights)
        if path is None:
            raise WeightsError(
                f"{weights or WEIGHTS_FILE}: MTCNN weights not found (run `python -m tools.convert_mtcnn`)"
            )
        # the shipped checksum applies wherever the file was found ($FSR_WEIGHTS_DIR, cache, --weights)
        state = load_safetensors(path, sha256=shipped_checksums().get(WEIGHTS_FILE))
        model = cls()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: not MTCNN weights ({str(exc).splitlines()[0]})") from None
        device = compute.device if compute is not None else torch.device("cpu")
        model.to(device)
        if device.type != "cpu":
            model.pnet_pixels = model.pyramid_pixels = 1 << 62
            model.rnet_batch, model.onet_batch, model.crop_chunk = 16384, 8192, 8192
        return model

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[np.ndarray],
        min_face: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> list[FaceDetections]:
        """Detect faces in a list of (H, W, 3) uint8 RGB arrays (any sizes).

        Returns one :class:`FaceDetections` per image, most confident face first.
        """
        if len(images) == 0:
            return []
        tensors = _as_chw_tensors(images)
        heights = torch.tensor([t.shape[1] for t in tensors], dtype=torch.int64, device=self.device)
        widths = torch.tensor([t.shape[2] for t in tensors], dtype=torch.int64, device=self.device)
        integral, boxes, inds = self._proposals(tensors, min_face, thresholds[0], factor)
        if boxes.shape[0] > 0:
            boxes, inds = self._refine(integral, boxes, inds, widths, heights, thresholds[1])
        points = torch.zeros((0, 5, 2), device=self.device)
        if boxes.shape[0] > 0:
            boxes, inds, points = self._output(integral, boxes, inds, widths, heights, thresholds[2])
        return _detections_per_image(boxes, points, inds, len(images))

    def _proposals(self, tensors: list[torch.Tensor], min_face: float, threshold: float, factor: float):
        """Stage 1: PNet over the pyramid, images of equal size batched together.

        Returns the integral images and the candidate boxes (M, 5) with their image indices (M,)."""
        device = self.device
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.shape[1], t.shape[2]), []).append(i)
        batches = [(torch.stack([tensors[i] for i in members]).to(device, non_blocking=True), members) for members in groups.values()]
        integral = _IntegralImages(batches, len(tensors), device)
        all_boxes, all_inds = [], []
        for (h, w), members in groups.items():
            members_t = torch.tensor(members, dtype=torch.int64, device=device)
            step = max(1, self.pyramid_pixels // (h * w))
            for start in range(0, len(members), step):
                boxes, inds = self._stage_one(integral, members_t[start : start + step], h, w, min_face, threshold, factor)
                all_boxes.append(boxes)
                all_inds.append(members_t[start + inds])
        return integral, torch.cat(all_boxes), torch.cat(all_inds)

    def _refine(self, integral, boxes, inds, widths, heights, threshold: float):
        """Stage 2: RNet rescoring, NMS per image, box regression and squaring."""
        y0, y1, x0, x1, valid = _clip_for_crop(boxes, widths[inds], heights[inds])
        boxes, inds = boxes[valid], inds[valid]
        reg, prob = self._crop_and_run(self.rnet, integral, inds, y0[valid], y1[valid], x0[valid], x1[valid], 24, self.rnet_batch)
        score = prob[:, 1]
        keep = score > threshold
        boxes = torch.cat([boxes[keep, :4], score[keep, None]], dim=1)
        inds, reg = inds[keep], reg[keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds, reg = boxes[pick], inds[pick], reg[pick]
        return _square(_regress(boxes, reg)), inds

    def _output(self, integral, boxes, inds, widths, heights, threshold: float):
        """Stage 3: ONet rescoring, 5 landmarks (M, 5, 2) in image pixels, box regression."""
        y0, y1, x0, x1, valid = _clip_for_crop(boxes, widths[inds], heights[inds])
        boxes, inds = boxes[valid], inds[valid]
        reg, marks, prob = self._crop_and_run(self.onet, integral, inds, y0[valid], y1[valid], x0[valid], x1[valid], 48, self.onet_batch)
        score = prob[:, 1]
        keep = score > threshold
        boxes = torch.cat([boxes[keep, :4], score[keep, None]], dim=1)
        inds, reg, marks = inds[keep], reg[keep], marks[keep]
        w_i = boxes[:, 2] - boxes[:, 0] + 1
        h_i = boxes[:, 3] - boxes[:, 1] + 1
        px = w_i[:, None] * marks[:, :5] + boxes[:, 0:1] - 1
        py = h_i[:, None] * marks[:, 5:10] + boxes[:, 1:2] - 1
        return _regress(boxes, reg), inds, torch.stack([px, py], dim=2)

    # ------------------------------------------------------------------ stages

    def _crop_and_run(self, net: nn.Module, integral: "_IntegralImages", inds, y0, y1, x0, x1, size: int, batch: int):
        """Cut + area-resize the candidate crops and run ``net`` on them, ``batch`` crops at a time."""
        outs = []
        for s in range(0, inds.shape[0], batch):
            sl = slice(s, s + batch)
            crops = integral.crops(inds[sl], y0[sl], y1[sl], x0[sl], x1[sl], size, self.crop_chunk)
            outs.append(net((crops - 127.5) * 0.0078125))
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def _stage_one(
        self, integral: "_IntegralImages", members: torch.Tensor, h: int, w: int, min_face: float, threshold: float,
        factor: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PNet over the pyramid of the (h, w) images ``members`` -> (boxes (K, 9), index into members (K,))."""
        picked_boxes, picked_inds = [], []
        device = integral.device
        for scale in pyramid_scales(h, w, min_face, factor):
            level = integral.resize_whole(members, int(h * scale + 1), int(w * scale + 1))
            level = ((level - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)
            step = max(1, self.pnet_pixels // (level.shape[2] * level.shape[3]))
            outs = [self.pnet(level[i : i + step]) for i in range(0, level.shape[0], step)]
            reg, prob = (torch.cat(parts) for parts in zip(*outs))
            boxes, inds = _generate_boxes(reg, prob[:, 1], scale, threshold)
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.5)
            picked_boxes.append(boxes[pick])
            picked_inds.append(inds[pick])
        if not picked_boxes:
            return torch.zeros((0, 5), device=device), torch.zeros((0,), dtype=torch.int64, device=device)
        boxes = torch.cat(picked_boxes)
        inds = torch.cat(picked_inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        regw = boxes[:, 2] - boxes[:, 0]
        regh = boxes[:, 3] - boxes[:, 1]
        refined = torch.stack(
            [
                boxes[:, 0] + boxes[:, 5] * regw,
                boxes[:, 1] + boxes[:, 6] * regh,
                boxes[:, 2] + boxes[:, 7] * regw,
                boxes[:, 3] + boxes[:, 8] * regh,
                boxes[:, 4],
            ],
            dim=1,
        )
        return _square(refined), inds


def _generate_boxes(reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float):
    """PNet map cells with P(face) >= threshold -> (K, 9) [x1, y1, x2, y2, score, reg(4)], image index (K,).

    A cell at (row, col) of the map covers the 12x12 window at (2*col, 2*row) of the scaled image.
    """
    mask = prob >= threshold
    where = mask.nonzero()
    inds = where[:, 0]
    score = prob[mask]
    offsets = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    cell = where[:, 1:].to(reg.dtype).flip(1)  # (x, y)
    q1 = ((2 * cell + 1) / scale).floor()
    q2 = ((2 * cell + 12) / scale).floor()
    return torch.cat([q1, q2, score[:, None], offsets], dim=1), inds


def _as_chw_tensors(images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """(H, W, 3) uint8 RGB arrays -> (3, H, W) uint8 tensors on the CPU; a clear error otherwise."""
    tensors = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
        tensors.append(torch.from_numpy(np.array(arr, copy=not arr.flags.writeable)).permute(2, 0, 1))
    return tensors


def _detections_per_image(boxes: torch.Tensor, points: torch.Tensor, inds: torch.Tensor, n_images: int) -> list[FaceDetections]:
    """Split the final boxes (M, 5), landmarks (M, 5, 2) by image index (M,), with a last NMS per image."""
    boxes_np = boxes.float().cpu().numpy()
    points_np = points.float().cpu().numpy()
    inds_np = inds.cpu().numpy()
    order = np.argsort(inds_np, kind="stable")
    bounds = np.searchsorted(inds_np[order], np.arange(n_images + 1))
    results = []
    for i in range(n_images):
        sel = order[bounds[i] : bounds[i + 1]]
        if sel.size == 0:
            results.append(FaceDetections.empty())
            continue
        pick = sel[_nms_min(boxes_np[sel][:, :4], boxes_np[sel][:, 4], 0.7)]
        results.append(
            FaceDetections(
                boxes=np.ascontiguousarray(boxes_np[pick, :4], dtype=np.float32),
                scores=np.ascontiguousarray(boxes_np[pick, 4], dtype=np.float32),
                landmarks=np.ascontiguousarray(points_np[pick], dtype=np.float32),
            )
        )
    return results
