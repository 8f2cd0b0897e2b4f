"""MTCNN port: weights conversion, parity with facenet-pytorch's pipeline, batching, crops."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fsr.core.weights import SHIPPED_WEIGHTS_DIR, WeightsError, sha256_file, shipped_checksums
from fsr.detect.crop import crop_square, extract_square, points_to_crop, square_box
from fsr.detect.mtcnn import MTCNN, FaceDetections, batched_nms
from tests.conftest import LFW_DIR, REFERENCE_DIR, SHARED_DATA, WILD_DIR


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return MTCNN.load()


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((REFERENCE_DIR / "mtcnn_reference.json").read_text())


def load_reference_image(key: str) -> np.ndarray:
    """Stored pixels, no EXIF transpose: how the reference was made."""
    path = SHARED_DATA / ("lfw/lfw-deepfunneled/" + key[4:] if key.startswith("lfw/") else key)
    return np.asarray(Image.open(path).convert("RGB"))


def parity(detector: MTCNN, reference: dict, keys: list[str]) -> dict:
    """Compare with the reference: image-level face counts, per-face max |error| of box and landmarks."""
    results = detector.detect([load_reference_image(k) for k in keys])
    faces = within = count_mismatch = 0
    worst = 0.0
    for key, found in zip(keys, results):
        expected = reference["detections"][key]
        if len(expected) != len(found):
            count_mismatch += 1
        for j, face in enumerate(expected):
            faces += 1
            if j >= len(found):
                continue
            error = max(
                np.abs(np.asarray(face["box"]) - found.boxes[j]).max(),
                np.abs(np.asarray(face["landmarks"]) - found.landmarks[j]).max(),
            )
            worst = max(worst, float(error))
            within += error <= 1.0
    return {"faces": faces, "within_1px": within, "images_with_other_count": count_mismatch, "worst": worst}


def test_converted_weights_are_reproducible_and_pinned(tmp_path):
    from tools.convert_mtcnn import convert, find_mtcnn_assets, main

    out = tmp_path / "mtcnn.safetensors"
    main(["--out", str(out)])
    assert sha256_file(out) == shipped_checksums()["mtcnn.safetensors"]
    # a tampered pickle is refused before joblib ever sees it
    assets = tmp_path / "assets"
    shutil.copytree(find_mtcnn_assets(), assets)
    with open(assets / "rnet.lz4", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(WeightsError, match="rnet.lz4: SHA-256 .* refusing to unpickle"):
        convert(assets)


def test_loader_verifies_the_checksum(tmp_path, monkeypatch):
    corrupt = tmp_path / "mtcnn.safetensors"
    data = bytearray((SHIPPED_WEIGHTS_DIR / "mtcnn.safetensors").read_bytes())
    data[-100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        MTCNN.load(weights=corrupt)


def test_parity_with_facenet_pytorch_on_a_subset(detector, reference):
    keys = sorted(reference["detections"])
    lfw = [k for k in keys if k.startswith("lfw/")][::10]  # 30 LFW images
    wild = ["wild/couple.jpg", "wild/img102.jpg", "wild/img25.jpg", "wild/img5.jpg"]  # two faces, EXIF, sizes
    stats = parity(detector, reference, lfw + wild)
    assert stats["faces"] >= 34
    assert stats["images_with_other_count"] == 0, stats
    assert stats["within_1px"] >= 0.99 * stats["faces"], stats


@pytest.mark.slow
def test_parity_with_facenet_pytorch_on_the_whole_reference(detector, reference):
    keys = sorted(reference["detections"])
    stats = parity(detector, reference, keys)
    print(stats)
    assert stats["faces"] == sum(len(v) for v in reference["detections"].values())
    assert stats["images_with_other_count"] <= 0.01 * len(keys), stats
    assert stats["within_1px"] >= 0.99 * stats["faces"], stats


def test_batched_detection_equals_one_image_at_a_time(detector):
    paths = [LFW_DIR / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg", WILD_DIR / "couple.jpg",
             LFW_DIR / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg", WILD_DIR / "img5.jpg"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images.append(np.full((180, 240, 3), 128, np.uint8))  # flat grey: no face
    together = detector.detect(images)
    for image, batched in zip(images, together):
        alone = detector.detect([image])[0]
        assert len(alone) == len(batched)
        np.testing.assert_allclose(alone.boxes, batched.boxes, atol=1e-2)
        np.testing.assert_allclose(alone.landmarks, batched.landmarks, atol=1e-2)
    assert len(together[-1]) == 0
    assert len(together[1]) == 2  # the couple
    for found in together[:4]:
        assert isinstance(found, FaceDetections)
        assert np.all(np.diff(found.scores) <= 0), "most confident first"
        left_eye, right_eye, nose, mouth_left, mouth_right = found.landmarks[0]
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_nms_is_torchvisions_on_crowded_boxes_of_several_images():
    """fsr loads torchvision's NMS kernel without importing torchvision; the result must be
    ``torchvision.ops.batched_nms``'s exactly, in both of its ways (one pass with offsets for a
    few boxes, image by image past 1,000 boxes), boxes that touch, duplicates and empty input."""
    import torch
    from torchvision.ops import batched_nms as torchvision_batched_nms

    generator = torch.Generator().manual_seed(7)
    for boxes_count in (0, 1, 12, 300, 999, 1001, 6000):
        corner = torch.rand(boxes_count, 2, generator=generator) * 200
        side = torch.rand(boxes_count, 1, generator=generator) * 50 + 1
        boxes = torch.cat([corner, corner + side], dim=1)
        boxes[1::17] = boxes[::17][: len(boxes[1::17])]  # exact duplicates
        scores = torch.rand(boxes_count, generator=generator)
        images = torch.randint(0, 5, (boxes_count,), generator=generator)
        for threshold in (0.5, 0.7):
            kept = batched_nms(boxes, scores, images, threshold)
            assert torch.equal(kept, torchvision_batched_nms(boxes, scores, images, threshold))
            if boxes_count > 12:
                assert 0 < len(kept) < boxes_count


def test_square_box_and_crop_geometry():
    x0, y0, side = square_box((10.0, 20.0, 50.0, 100.0), margin=0.25)
    assert side == 120  # max(40, 80) * 1.5
    assert (x0 + side / 2, y0 + side / 2) == (30.0, 60.0)
    assert square_box((10.0, 20.0, 50.0, 100.0), margin=0.0)[2] == 80

    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    window = extract_square(image, -5, -3, 12)
    np.testing.assert_array_equal(window[3:, 5:], image[:9, :7])
    np.testing.assert_array_equal(window[0, 0], image[0, 0])  # replicated corner
    np.testing.assert_array_equal(window[:3, 7], np.repeat(image[0:1, 2], 3, axis=0))  # replicated top row
    np.testing.assert_array_equal(crop_square(image, 4, 2, 16, size=16), image[2:18, 4:20])

    face = np.asarray(Image.open(LFW_DIR / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").convert("RGB"))
    out = crop_square(face, 40, 40, 170, size=128)
    expected = np.asarray(Image.fromarray(face[40:210, 40:210]).resize((128, 128), Image.BICUBIC))
    np.testing.assert_array_equal(out, expected)
    # pixel centres map consistently: the crop's centre is the output's centre
    np.testing.assert_allclose(points_to_crop(np.array([[40 + 84.5, 40 + 84.5]]), 40, 40, 170, 128), [[63.5, 63.5]])
