"""The fixed 4x4 sub-pixel pattern of pixel-shuffle generators (fsr.models.phase): measured on
real faces, removed through the upsampler bias, and absent from the shipped corrected models."""

from __future__ import annotations

import json

import pytest
import torch

from fsr.core.device import Compute
from fsr.core.weights import SHIPPED_WEIGHTS_DIR, load_safetensors, sha256_file
from fsr.models.phase import (flat_field_range, main, peak_to_peak_grey_levels as _peak_to_peak, phase_means,
                              phase_pattern, remove_phase_pattern)
from fsr.models.sr import read_card
from fsr.models.systems import load_generator_file, load_sr_system

from .test_default_model import _held_out_celeba_faces, _lr_faces, _pairs_identities, _psnr
from .conftest import LFW_DIR, lfw_centre_face
from .test_train import prepared  # noqa: F401 - the fixture: six CelebA identities prepared by `fsr prepare`


def _lfw_faces(n: int) -> torch.Tensor:
    names = _pairs_identities()[7::90][:n]
    return torch.stack([lfw_centre_face(sorted((LFW_DIR / name).glob("*.jpg"))[0]) for name in names])


def test_a_planted_grid_is_measured_on_real_faces_and_removed_through_the_bias():
    """fsr_celeba (L1 only: no pattern of its own) with a known 4x4 pattern of about 3 grey
    levels added to its upsampler bias: measured on held-out CelebA faces the pattern comes back
    to within 0.3 grey levels, and removing it restores the model's outputs on other (LFW) faces
    to within half a grey level, with the PSNR it had."""
    compute = Compute.create("cpu", batch_size=24)
    clean = load_sr_system("fsr_celeba", compute)
    planted = load_sr_system("fsr_celeba", compute)
    grid = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5) * 3 / 255
    grid -= grid.mean(dim=(1, 2), keepdim=True)
    with torch.no_grad():
        planted.model.conv_up_ps.bias += grid.reshape(-1)

    hr_a = _held_out_celeba_faces(24)
    measured = phase_pattern(planted.upscale, _lr_faces(hr_a), hr_a) - phase_pattern(clean.upscale, _lr_faces(hr_a), hr_a)
    assert float((measured - grid).abs().max()) * 255 < 0.3
    own = phase_pattern(planted.upscale, _lr_faces(hr_a), hr_a)
    assert _peak_to_peak(own) > 2.0

    state = {k: v.clone() for k, v in planted.model.state_dict().items()}
    corrected = load_sr_system("fsr_celeba", compute)
    corrected.model.load_state_dict(remove_phase_pattern(state, own))
    hr_b = _lfw_faces(24)
    lr_b = _lr_faces(hr_b)
    before, after, reference = planted(lr_b), corrected(lr_b), clean(lr_b)
    assert _peak_to_peak(phase_pattern(corrected.upscale, lr_b, hr_b)) < 0.6
    assert float((after - reference).abs().max()) * 255 < 0.5
    assert _psnr(after, hr_b).mean() > _psnr(before, hr_b).mean()
    assert max(flat_field_range(corrected.upscale)) < 0.5 < 2.0 < max(flat_field_range(planted.upscale))


def test_the_correction_needs_a_pixel_shuffle_generator_and_never_overwrites_its_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="pixel-shuffle"):
        remove_phase_pattern({"conv_last.bias": torch.zeros(3)}, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="48"):
        remove_phase_pattern(load_safetensors(SHIPPED_WEIGHTS_DIR / "fsr_fast.safetensors"), torch.zeros(3, 2, 2))
    weights = SHIPPED_WEIGHTS_DIR / "fsr_fast.safetensors"
    assert main([str(weights), str(weights), "--data", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_the_correction_command_writes_a_corrected_export_with_its_record(prepared, tmp_path):
    """`python -m fsr.models.phase` on fsr_verify (identity-trained, not corrected) with the
    training faces of a set `fsr prepare` made: the new export loads, its card records what was
    removed and from which file, and its flat-field pattern is below the original's."""
    source = SHIPPED_WEIGHTS_DIR / "fsr_verify.safetensors"
    out = tmp_path / "fsr_verify_flat.safetensors"
    assert main([str(source), str(out), "--data", str(prepared), "--faces", "40", "--threads", "2"]) == 0
    record = read_card(out).extra["phase_correction"]
    assert record["uncorrected_sha256"] == sha256_file(source) and record["faces"] >= 20
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == sha256_file(out)
    assert record["pattern_peak_to_peak_grey_levels"] > 1.0
    assert max(record["flat_field_range_after"]) < max(record["flat_field_range_before"])
    corrected = load_sr_system(str(out), Compute.create("cpu"))
    assert [round(v, 3) for v in flat_field_range(corrected.upscale)] == record["flat_field_range_after"]


def test_the_phase_penalty_of_fsr_train_pulls_the_upsampler_against_the_grid(prepared, tmp_path):
    """`loss.phase` (the mean square of the batch's 4x4 SR - HR phase means): on real faces its
    gradient on the upsampler bias points along a planted grid, so gradient descent takes the
    grid out; and `fsr train` with it logs the term, without it does not."""
    from typer.testing import CliRunner

    from fsr.cli import app

    source = SHIPPED_WEIGHTS_DIR / "fsr_celeba.safetensors"
    generator, card = load_generator_file(source)
    grid = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5) * 6 / 255
    grid -= grid.mean(dim=(1, 2), keepdim=True)
    generator.load_state_dict(remove_phase_pattern(generator.state_dict(), -grid))
    hr = _held_out_celeba_faces(16)
    penalty = phase_means(generator(_lr_faces(hr)) - hr).square().mean()
    penalty.backward()
    gradient = generator.conv_up_ps.bias.grad.view(3, 4, 4)
    assert float(torch.nn.functional.cosine_similarity(gradient.flatten(), grid.flatten(), dim=0)) > 0.95

    logged = {}
    for weight in (0.0, 1000.0):
        run = tmp_path / f"run_{weight:g}"
        result = CliRunner().invoke(app, [
            "train", str(prepared), "--run-dir", str(run), "--preset", "esrgan", "--perceptual", "none",
            "--steps", "2", "--batch-size", "4", "--device", "cpu", "--threads", "2", "--no-progress",
            "--set", "loss.gan=none", "--set", f"loss.phase={weight}", "--set", f"model.init_weights={source}",
            *[f"--set=model.{k}={str(v).lower()}" for k, v in card.arch_args.items() if k not in ("in_ch", "out_ch")],
            "--set", "train.val_every=0", "--set", "train.sample_every=0", "--set", "train.log_every=1"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        logged[weight] = [row["l_phase"] for row in rows if row.get("kind") == "train" and "l_phase" in row]
    assert logged[0.0] == [] and len(logged[1000.0]) == 2 and all(v > 0 for v in logged[1000.0])


def test_the_shipped_gan_model_leaves_no_grid_on_unseen_faces():
    """fsr_ipfsrgan was trained with the pattern penalty: on held-out CelebA faces its mean 4x4
    SR - HR pattern is well under the 2 grey levels the identity-trained default carries."""
    compute = Compute.create("cpu", batch_size=24)
    hr = _held_out_celeba_faces(24)
    lr = _lr_faces(hr)
    gan = _peak_to_peak(phase_pattern(load_sr_system("fsr_ipfsrgan", compute).upscale, lr, hr))
    default = _peak_to_peak(phase_pattern(load_sr_system("default", compute).upscale, lr, hr))
    assert gan < 1.0 < default, (gan, default)
