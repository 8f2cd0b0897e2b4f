"""The shipped default model: checksummed, described by its card, and better than bicubic
on LFW faces it never saw (identities named in pairs.txt are never trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsr.core.device import Compute
from fsr.core.weights import SHIPPED_WEIGHTS_DIR, sha256_file, shipped_checksums
from fsr.data.degrade import bicubic_down, quantise_8bit
from fsr.evaluate.metrics import pixel_metrics
from fsr.models.systems import DEFAULT_MODEL_NAME, load_sr_system

from .conftest import LFW_DIR, SHARED_DATA, lfw_centre_face


def _pairs_identities() -> list[str]:
    names: set[str] = set()
    for line in (SHARED_DATA / "lfw" / "pairs.txt").read_text().splitlines()[1:]:
        parts = line.split()
        names.update([parts[0]] if len(parts) == 3 else [parts[0], parts[2]])
    return sorted(names)


def _lr_faces(hr: torch.Tensor) -> torch.Tensor:
    """The 32 px LR faces of (N, 3, 128, 128) HR faces: bicubic /4 on the 8-bit grid."""
    return quantise_8bit(bicubic_down(hr, 4))


def _psnr(sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    """Per-face RGB PSNR (dB), as `fsr metrics` computes it."""
    return pixel_metrics(sr, hr)["psnr_rgb"]


def _shipped_card(name: str) -> dict:
    """The JSON model card beside weights/NAME.safetensors."""
    return json.loads((SHIPPED_WEIGHTS_DIR / f"{name}.json").read_text())


def _assert_beats_the_file_it_replaces(card: dict, *, identity: bool) -> None:
    """A shipped file replaced an earlier one only by doing better on every held-out set: a
    higher ``psnr_gain`` and, with ``identity``, a lower ``id_distance_change`` than the figures
    of the replaced file recorded in the card's ``replaces``."""
    previous = card["replaces"]
    assert previous["sha256"] != card["sha256"]
    for name, gain in previous["heldout_psnr_gain"].items():
        model = card["heldout"]["sets"][name]["model"]
        assert model["psnr_gain"] > gain, name
        if identity:
            assert model["id_distance_change"] < previous["heldout_id_distance_change"][name], name


def _sweep_average_at_or_above_bicubic(sweep: dict, system: str) -> float:
    """A card's fp32 LFW sweep (``lfw_verification_dlib_6000_pairs``): ``system`` is at or above
    bicubic at each of the 8 alphas from 0.3 to 1, and the recorded average over them is their
    mean; returns that average."""
    accuracy = sweep["accuracy"]
    alphas = [a for a in accuracy["bicubic"] if float(a) >= 0.3]
    assert len(alphas) == 8 and all(accuracy[system][a] >= accuracy["bicubic"][a] for a in alphas)
    average = sum(accuracy[system][a] for a in alphas) / len(alphas)
    assert abs(average - sweep["average_over_alpha_0.3_to_1"][system]) < 1e-4
    return average


def _earlier_deep_model_file_sha256(nb: int) -> str:
    """SHA-256 of the earlier fsr_deep file with ``nb`` RRDB blocks (nf 32) that shipped models were
    fine-tuned from: the shipped fsr_deep's card lists every such file (all in the repository
    history), the newest first, the first being the file it replaced."""
    deep = _shipped_card("fsr_deep")
    assert deep["earlier_files"][0]["sha256"] == deep["replaces"]["sha256"]
    files = [f for f in deep["earlier_files"] if f["arch_args"]["nb"] == nb and f["arch_args"]["nf"] == 32]
    assert files, nb
    return files[0]["sha256"]


def test_default_model_is_the_identity_fine_tune_of_the_deep_model_and_records_its_figures():
    """weights/fsr_default: checksummed, and its card says what it is (fsr_deep fine-tuned with
    the identity loss, Eq. 5) and holds its held-out figures: above bicubic with a lower dlib
    distance on every held-out set, and its LFW verification sweep."""
    weights = SHIPPED_WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}.safetensors"
    assert shipped_checksums()[weights.name] == sha256_file(weights)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["architecture"] == "rrdb" and card["scale"] == 4 and card["input_size"] == 32
    assert card["sha256"] == sha256_file(weights) and "command" in card and "training_data" in card
    config = card["config"]
    # the 16-block fsr_deep of 2026-12-06 fine-tuned, from the file its card names
    assert config["model"]["init_weights"] == "weights/fsr_deep.safetensors" and card["arch_args"]["nb"] == 16
    other_cards = {name: _shipped_card(name) for name in ("fsr_fast", "fsr_deep", "fsr_ipfsrgan")}
    assert card["init_weights_sha256"] == _earlier_deep_model_file_sha256(16)
    assert config["loss"]["identity"] > 0 and config["loss"]["gan"] == "none"
    _assert_beats_the_file_it_replaces(card, identity=True)
    others = {name: other["heldout"]["sets"] for name, other in other_cards.items()}
    below_gan = 0
    for name, figures in card["heldout"]["sets"].items():
        model = figures["model"]
        assert model["n"] >= 800 and model["psnr_gain"] > 2.0 and model["ssim_gain"] >= 0.06, (name, model)
        # a lower dlib distance than fsr_fast and fsr_deep on every held-out set, than fsr_ipfsrgan on three of
        # the four (at CelebA margin 0.1 the GAN model is 0.05 points lower; fsr_verify, with three times the
        # identity weight, has its own test)
        assert model["id_distance_change"] < min(others[o][name]["model"]["id_distance_change"]
                                                 for o in ("fsr_fast", "fsr_deep")), name
        below_gan += model["id_distance_change"] < others["fsr_ipfsrgan"][name]["model"]["id_distance_change"]
    assert below_gan >= 3
    assert set(card["heldout"]["sets"]) == {"celeba_m0.1", "celeba_m0.25", "celeba_m0.4", "lfw_fold1"}
    # the full LFW protocol (6,000 pairs, dlib): at or above bicubic at every alpha from 0.3 to 1
    sweep = card["lfw_verification_dlib_6000_pairs"]
    assert sweep["pairs"] == 6000 and sweep["command"].count("--system") == 2 and "--limit" not in sweep["command"]
    average = _sweep_average_at_or_above_bicubic(sweep, "fsr_default")
    assert average > card["replaces"]["lfw_verification_average_over_alpha_0.3_to_1"]


def test_fast_model_is_the_recorded_interpolation_of_the_two_shipped_models(tmp_path):
    """weights/fsr_fast (the default until 2026-11-30) = 0.5 * fsr_l1 + 0.5 * fsr_identity,
    reproducible from the shipped files."""
    from safetensors.torch import load_file

    from fsr.models.interpolate import interpolate_exports

    for name in ("fsr_l1", "fsr_identity"):
        path = SHIPPED_WEIGHTS_DIR / f"{name}.safetensors"
        assert shipped_checksums()[path.name] == sha256_file(path)
        card = json.loads(path.with_suffix(".json").read_text())
        assert card["lfw_pairs_evaluation"]["pixels_7700_faces"][name]["psnr_rgb"] > 29
    card = _shipped_card("fsr_fast")
    recipe = card["interpolation"]
    assert recipe["weight"] == 0.5 and recipe["A"]["file"] == "fsr_l1.safetensors" and recipe["B"]["file"] == "fsr_identity.safetensors"
    assert recipe["A"]["sha256"] == shipped_checksums()["fsr_l1.safetensors"]
    out, _ = interpolate_exports(SHIPPED_WEIGHTS_DIR / "fsr_l1.safetensors", SHIPPED_WEIGHTS_DIR / "fsr_identity.safetensors",
                                 0.5, tmp_path / "again.safetensors")
    again, shipped = load_file(out), load_file(SHIPPED_WEIGHTS_DIR / "fsr_fast.safetensors")
    assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in shipped)


def test_verification_model_is_the_default_recipe_with_more_identity_weight_and_records_its_sweep():
    """weights/fsr_verify: checksummed, the 12-block fsr_deep fine-tuned with three times the
    identity weight (Eq. 5) of the default of its day (the 12-block default, whose figures its card
    keeps in ``compared_with``), a lower dlib distance than that default on
    every held-out set, and the LFW sweep it was shipped on: at or above bicubic at every alpha
    from 0.3 to 1, an average above that default's and above the file it replaces, and 'same
    person' for every example crop."""
    weights = SHIPPED_WEIGHTS_DIR / "fsr_verify.safetensors"
    assert shipped_checksums()[weights.name] == sha256_file(weights)
    card, default = _shipped_card("fsr_verify"), _shipped_card(DEFAULT_MODEL_NAME)
    default_of_its_day = card["compared_with"]
    assert default_of_its_day["sha256"] not in (card["sha256"], default["sha256"])
    assert card["sha256"] == sha256_file(weights) and card["arch_args"]["nb"] == 12
    config = card["config"]
    assert config["model"]["init_weights"] == "weights/fsr_deep.safetensors"
    assert card["init_weights_sha256"] == _earlier_deep_model_file_sha256(12)
    assert config["loss"]["identity"] == 3 * default["config"]["loss"]["identity"]
    for name, figures in card["heldout"]["sets"].items():
        model = figures["model"]
        assert model["n"] >= 800 and model["psnr_gain"] > 2.0, (name, model)
        assert model["id_distance_change"] < default_of_its_day["heldout_id_distance_change"][name], name
    assert set(card["heldout"]["sets"]) == set(default_of_its_day["heldout_id_distance_change"])
    sweep = card["lfw_verification_dlib_6000_pairs"]
    assert sweep["pairs"] == 6000 and "--limit" not in sweep["command"] and "--precision fp32" in sweep["command"]
    average = _sweep_average_at_or_above_bicubic(sweep, "fsr_verify")
    assert average > sweep["average_over_alpha_0.3_to_1"]["fsr_default"]
    assert sweep["average_over_alpha_0.3_to_1"]["fsr_default"] == pytest.approx(
        default_of_its_day["lfw_verification_average_over_alpha_0.3_to_1"], abs=1e-4)
    assert average > card["replaces"]["lfw_verification_average_over_alpha_0.3_to_1"]
    assert card["replaces"]["sha256"] != card["sha256"]
    assert max(card["examples_verify"]["dlib_distance"].values()) < 0.6


@pytest.mark.parametrize("model_name", ["default", "fsr_fast", "fsr_verify", "fsr_celeba", "fsr_deep", "fsr_ipfsrgan", "fsr_jpeg"])
def test_shipped_model_beats_bicubic_on_unseen_lfw_faces(model_name):
    # 32 evaluation identities (named in pairs.txt, so never in the training data); the face
    # sits in the centre of LFW's deep-funneled images: a 160-px centre square ~ fsr's crop.
    names = _pairs_identities()[::130][:32]
    hr_t = torch.stack([lfw_centre_face(sorted((LFW_DIR / name).glob("*.jpg"))[0]) for name in names])
    lr = _lr_faces(hr_t)
    model = load_sr_system(model_name, Compute.create("cpu", batch_size=16))
    bicubic = load_sr_system("bicubic")

    gain = _psnr(model(lr), hr_t) - _psnr(bicubic(lr), hr_t)
    assert gain.mean() > 1.5, gain.mean()
    assert (gain > 0).mean() >= 0.9  # better on nearly every face, not only on average


def test_self_ensemble_inverts_each_flip_and_helps_on_unseen_faces():
    from fsr.models.systems import dihedral, undo_dihedral

    x = torch.rand(2, 3, 6, 9)
    views = [dihedral(x, k) for k in range(8)]
    assert all(torch.equal(undo_dihedral(v, k), x) for k, v in enumerate(views))
    assert len({tuple(v.flatten()[:20].tolist()) for v in views}) == 8  # 8 different views

    names = _pairs_identities()[5::65][:48]
    hr_t = torch.stack([lfw_centre_face(sorted((LFW_DIR / name).glob("*.jpg"))[0]) for name in names])
    lr = _lr_faces(hr_t)
    compute = Compute.create("cpu", batch_size=48)
    single, ensemble = load_sr_system("default", compute), load_sr_system("default+", compute)
    assert ensemble.self_ensemble and ensemble.name == "default+"
    mse = lambda sr: float(((sr - hr_t) ** 2).mean())  # noqa: E731
    assert mse(ensemble(lr)) < mse(single(lr))  # the mean of the face's and its mirror's estimate
    with pytest.raises(Exception, match="needs a model"):
        load_sr_system("bicubic+")


def _held_out_celeba_faces(n: int = 24) -> torch.Tensor:
    """(n, 3, 128, 128) faces of fsr's held-out CelebA identities (never trained or tuned on),
    one per identity: the centre crop at margin 0.25 of the face-centred CelebA crops."""
    from fsr.core.io import read_image, to_tensor
    from fsr.data.degrade import resize_bicubic
    from tests.conftest import CELEBA_DIR

    import fsr

    split = Path(fsr.__file__).parent / "data" / "splits" / "celeba_test_identities.txt"
    held_out = [line.strip() for line in split.read_text().splitlines() if line.strip() and not line.startswith("#")]
    faces = []
    for identity in held_out[:n]:
        rgb = read_image(sorted((CELEBA_DIR / identity).glob("*.jpg"))[0]).rgb
        side = rgb.shape[0]  # square crop of twice the face box: margin 0.25 = the centre 3/4
        lo, hi = round(side / 8), round(side * 7 / 8)
        faces.append(resize_bicubic(to_tensor(rgb[lo:hi, lo:hi])[None], 128).clamp(0, 1)[0])
    return torch.stack(faces)


def test_celeba_models_restore_held_out_celeba_faces_better_than_the_fast_model():
    """fsr_celeba and fsr_deep (fsr_celeba grown to 16 RRDB blocks and widened) never saw fsr's 40 held-out
    CelebA identities: on their faces each beats the one it was trained from."""
    hr_t = _held_out_celeba_faces()
    lr = _lr_faces(hr_t)
    compute = Compute.create("cpu", batch_size=24)

    def psnr(system: str) -> float:
        return float(_psnr(load_sr_system(system, compute)(lr), hr_t).mean())

    bicubic, fast, celeba, deep = psnr("bicubic"), psnr("fsr_fast"), psnr("fsr_celeba"), psnr("fsr_deep")
    assert deep > celeba > fast > bicubic + 1.5, (bicubic, fast, celeba, deep)


@pytest.mark.parametrize("model_name", ["default", "fsr_ipfsrgan"])
def test_shipped_model_keeps_the_colour_of_unseen_faces(model_name):
    """No colour shift (a complaint about face restorers): on held-out CelebA faces each face's
    SR - HR mean moves no colour channel more than 1 grey level away from the other two."""
    from fsr.evaluate.metrics import colour_shift

    hr_t = _held_out_celeba_faces()
    sr = load_sr_system(model_name, Compute.create("cpu", batch_size=24))(_lr_faces(hr_t)).clamp(0, 1)
    shift = colour_shift(sr, hr_t)
    assert float(shift.max()) < 1.0, shift


def test_default_keeps_identity_better_than_the_models_it_replaced_on_held_out_faces():
    """On held-out CelebA faces (never trained or tuned on), the default (fsr_deep fine-tuned
    with the identity loss) is nearer the real face in dlib's identity space than fsr_fast (the
    previous default) and bicubic, and beats fsr_fast's PSNR as well. Against fsr_deep (trained
    further since the fine-tune started from it) the full held-out sets in the cards decide:
    see test_default_model_is_the_identity_fine_tune_of_the_deep_model_and_records_its_figures."""
    from fsr.models.face import IdentityEmbedder, create_face_model

    hr_t = _held_out_celeba_faces()
    lr = _lr_faces(hr_t)
    compute = Compute.create("cpu", batch_size=24)
    dlib = IdentityEmbedder(create_face_model("dlib", compute=compute))
    real = dlib.embed_batched(hr_t)  # dlib's raw descriptors: its own distance is Euclidean
    sr = {name: load_sr_system(name, compute)(lr).clamp(0, 1) for name in ("bicubic", "fsr_fast", "fsr_deep", "default")}
    distance = {name: float((dlib.embed_batched(x) - real).norm(dim=1).mean()) for name, x in sr.items()}
    psnr = {name: float(_psnr(x, hr_t).mean()) for name, x in sr.items()}
    assert distance["default"] < distance["fsr_fast"] < distance["bicubic"], distance
    assert distance["fsr_deep"] < distance["bicubic"], distance
    assert distance["default"] < 0.9 * distance["bicubic"], distance
    assert psnr["default"] > psnr["fsr_fast"] > psnr["bicubic"] + 1.5, psnr


def test_deep_model_is_the_celeba_model_grown_and_records_its_held_out_figures():
    card = _shipped_card("fsr_deep")
    # fsr_celeba's 2 blocks grown to 8, those to 12, those to 16, and those widened from nf 32 to 48
    assert card["arch_args"]["nb"] == 16 and card["arch_args"]["nf"] == 48
    assert card["sha256"] == shipped_checksums()["fsr_deep.safetensors"]
    # grown from fsr_celeba, or trained further from an earlier fsr_deep file that it replaces
    init = card["config"]["model"]["init_weights"]
    assert init in ("weights/fsr_celeba.safetensors", "weights/fsr_deep.safetensors"), init
    if init.endswith("fsr_deep.safetensors"):
        assert card["init_weights_sha256"] == card["replaces"]["sha256"]
        _assert_beats_the_file_it_replaces(card, identity=False)
    sets = card["heldout"]["sets"]
    for name in ("celeba_m0.1", "celeba_m0.25", "celeba_m0.4", "lfw_fold1"):
        assert sets[name]["model"]["n"] >= 800 and sets[name]["model"]["psnr_gain"] > 2.0
    low, high = card["lr_face_range"]
    assert low <= 24 and high >= 64


def test_ipfsrgan_model_is_the_gan_fine_tune_of_the_deep_model():
    """fsr_ipfsrgan: the 16-block fsr_deep of nf 32 (shipped before fsr_deep was widened) fine-tuned
    with the paper's loss (RaGAN + identity + perceptual + L1), better on every held-out set than
    the 8-block file it replaced."""
    card = _shipped_card("fsr_ipfsrgan")
    config = card["config"]
    assert card["sha256"] == shipped_checksums()["fsr_ipfsrgan.safetensors"]
    # the start is named by its digest: the 16-block file, shipped as weights/fsr_deep then, taken from the history since
    assert config["model"]["init_weights"].endswith(".safetensors") and card["arch_args"]["nb"] == 16
    assert card["init_weights_sha256"] == _earlier_deep_model_file_sha256(16)
    _assert_beats_the_file_it_replaces(card, identity=True)
    # trained with the sub-pixel pattern penalty: a fraction of the grid of the file it replaced
    assert config["loss"]["phase"] > 0
    assert card["subpixel_pattern_grey_levels"]["held_out_faces_celeba_m0.25"] < 1.0
    assert max(card["subpixel_pattern_grey_levels"]["flat_0.2_0.5_0.8"]) < min(
        card["replaces"]["subpixel_pattern_grey_levels"]["flat_0.2_0.5_0.8"])
    assert config["loss"]["gan"] == "ragan" and config["loss"]["adversarial"] > 0
    assert config["loss"]["identity"] > 0 and config["loss"]["perceptual_net"] == "identity"
    sets = card["heldout"]["sets"]
    for name in ("celeba_m0.1", "celeba_m0.25", "celeba_m0.4", "lfw_fold1"):
        model = sets[name]["model"]
        assert model["n"] >= 800 and model["psnr_gain"] > 1.5 and model["id_distance_change"] < 0, (name, model)


def test_gan_model_restores_texture_the_psnr_model_smooths_away():
    """On held-out CelebA faces the GAN fine-tune puts back high-frequency detail (mean absolute
    Laplacian) that the L1-trained fsr_deep averages away, without overshooting the real faces',
    and stays well above bicubic in PSNR."""
    hr_t = _held_out_celeba_faces()
    lr = _lr_faces(hr_t)
    compute = Compute.create("cpu", batch_size=24)
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)

    def detail(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, laplacian, groups=3).abs().mean(dim=(1, 2, 3))

    deep, gan = (load_sr_system(m, compute)(lr).clamp(0, 1) for m in ("fsr_deep", "fsr_ipfsrgan"))
    bicubic = load_sr_system("bicubic")(lr).clamp(0, 1)
    assert (detail(gan) > detail(deep)).all()
    assert detail(gan).mean() > 1.4 * detail(deep).mean()
    assert detail(gan).mean() < detail(hr_t).mean()
    assert _psnr(gan, hr_t).mean() > _psnr(bicubic, hr_t).mean() + 1.5


@pytest.mark.parametrize("model_name", ["fsr_default", "fsr_fast", "fsr_celeba", "fsr_deep", "fsr_verify", "fsr_ipfsrgan",
                                        "fsr_jpeg"])
def test_shipped_models_take_the_face_crops_fsr_prepare_makes(model_name):
    """Each card's measured face-size range admits the faces of 24-160 px crops framed as
    `fsr prepare` frames them, so `fsr upscale --model NAME` on such crops uses the network."""
    from fsr.models.face.pipeline import routes_to_sr
    from fsr.models.sr import read_card
    from fsr.upscale import UpscaleOptions, crop_face_side

    card = read_card(SHIPPED_WEIGHTS_DIR / f"{model_name}.safetensors")
    margin = UpscaleOptions().margin
    for crop in (24, 32, 48, 64, 128, 160):
        assert routes_to_sr(crop_face_side(crop, crop, margin), card.lr_face_range), (crop, card.lr_face_range)


def test_jpeg_model_restores_compressed_held_out_faces_better_than_the_default():
    """fsr_jpeg is the default's recipe with half of the LR faces JPEG-compressed, fine-tuned from the
    shipped default. On held-out CelebA faces whose 32 px LR faces were stored at JPEG quality 50 it
    is nearer the real face than the default, in pixels and in dlib's identity space, and on lossless
    faces it still beats bicubic clearly; its card records the lineage and both tables."""
    from fsr.data.degrade import jpeg_degrade
    from fsr.models.face import IdentityEmbedder, create_face_model

    card, default = _shipped_card("fsr_jpeg"), _shipped_card(DEFAULT_MODEL_NAME)
    assert card["init_weights_sha256"] == default["sha256"] and card["config"]["data"]["jpeg_augment"] == 0.5
    table = card["jpeg_inputs"]["results"]
    for quality in ("90", "75", "50", "30"):
        ours, theirs = table[quality]["fsr_jpeg"], table[quality]["default"]
        assert ours["psnr_gain"] > theirs["psnr_gain"] and ours["id_distance"] < theirs["id_distance"], quality
    assert all(s["model"]["psnr_gain"] > 1.5 for s in card["heldout"]["sets"].values())

    hr_t = _held_out_celeba_faces()
    lr = _lr_faces(hr_t)
    compressed = jpeg_degrade(lr, [50] * len(lr), [(5 * i % 16, 11 * i % 16) for i in range(len(lr))])
    compute = Compute.create("cpu", batch_size=24)
    systems = {name: load_sr_system(name, compute) for name in ("bicubic", "default", "fsr_jpeg")}
    sr = {name: system(compressed).clamp(0, 1) for name, system in systems.items()}
    psnr = {name: float(_psnr(x, hr_t).mean()) for name, x in sr.items()}
    assert psnr["fsr_jpeg"] > psnr["default"] + 0.15 and psnr["fsr_jpeg"] > psnr["bicubic"] + 0.15, psnr
    dlib = IdentityEmbedder(create_face_model("dlib", compute=compute))
    real = dlib.embed_batched(hr_t)
    distance = {name: float((dlib.embed_batched(x) - real).norm(dim=1).mean()) for name, x in sr.items()}
    assert distance["fsr_jpeg"] < distance["default"], distance
    lossless = float(_psnr(systems["fsr_jpeg"](lr), hr_t).mean()) - float(_psnr(systems["bicubic"](lr), hr_t).mean())
    assert lossless > 1.5, lossless
