"""Network interpolation of two fsr exports (ESRGAN Sec. 3.4): exact end points, the midpoint,
its card, and clear errors for generators that do not fit together."""

from __future__ import annotations

import json

import pytest
import torch

from fsr.models.generators import build_generator
from fsr.models.interpolate import InterpolationError, interpolate_exports, main
from fsr.models.systems import load_generator_file
from fsr.train.checkpoint import export_generator

ARGS = {"nf": 8, "nb": 1, "gc": 8, "upsampler": "pixelshuffle", "bicubic_skip": True}


def _export(tmp_path, name: str, seed: int, args: dict = ARGS):
    torch.manual_seed(seed)
    model = build_generator("rrdb", **args)
    path, _ = export_generator(model.state_dict(), tmp_path / f"{name}.safetensors",
                               {"architecture": "rrdb", "arch_args": args, "input_size": 32, "output_size": 128})
    return path, model.eval()


def test_end_points_midpoint_and_card(tmp_path):
    path_a, model_a = _export(tmp_path, "a", 0)
    path_b, model_b = _export(tmp_path, "b", 1)
    lr = torch.rand(2, 3, 32, 32)
    for weight, expected in ((0.0, model_a), (1.0, model_b)):
        out, _ = interpolate_exports(path_a, path_b, weight, tmp_path / f"w{weight}.safetensors")
        model, _ = load_generator_file(out)
        with torch.no_grad():
            assert torch.equal(model.eval()(lr), expected(lr))
    out, card_path = interpolate_exports(path_a, path_b, 0.25, tmp_path / "quarter.safetensors")
    mid, card = load_generator_file(out)
    for (key, value), a, b in zip(mid.state_dict().items(), model_a.state_dict().values(), model_b.state_dict().values()):
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * a + 0.25 * b, msg=key)
    saved = json.loads(card_path.read_text())
    assert saved["interpolation"]["weight"] == 0.25 and saved["arch_args"] == ARGS
    assert len(saved["interpolation"]["A"]["sha256"]) == 64 and saved["sha256"] != saved["interpolation"]["A"]["sha256"]


def test_mismatched_generators_and_bad_weight_are_refused(tmp_path, capsys):
    path_a, _ = _export(tmp_path, "a", 0)
    path_c, _ = _export(tmp_path, "c", 0, {**ARGS, "nf": 16})
    with pytest.raises(InterpolationError, match="arch_args differs"):
        interpolate_exports(path_a, path_c, 0.5, tmp_path / "x.safetensors")
    with pytest.raises(InterpolationError, match="weight must be in"):
        interpolate_exports(path_a, path_a, 1.5, tmp_path / "x.safetensors")
    assert main([str(path_a), str(path_c), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "arch_args differs" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()
