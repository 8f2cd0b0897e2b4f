"""The training configuration (one converter, typed choices, one merge path) and the one
identity stack shared by training and evaluation, on real LFW faces."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fsr.cli import app
from fsr.core.device import Compute
from fsr.evaluate.identity import FaceEmbedder, load_face_model
from fsr.models.face import FaceModelError, IdentityEmbedder, create_face_model
from fsr.train.config import (
    Config,
    ConfigError,
    build_config,
    config_from_dict,
    dump_config,
    merge_options,
)
from fsr.train.losses import IdentityFeatures
from tests.conftest import LFW_DIR, lfw_centre_face



def test_json_toml_and_yaml_files_give_the_same_config(tmp_path):
    mapping = {"preset": "esrgan", "model": {"nf": 16, "upsampler": "pixelshuffle"}, "train": {"batch_size": 8}}
    (tmp_path / "c.json").write_text(json.dumps(mapping))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(mapping))
    (tmp_path / "c.toml").write_text('preset = "esrgan"\n[model]\nnf = 16\nupsampler = "pixelshuffle"\n[train]\nbatch_size = 8\n')
    dumps = {dump_config(build_config(config_file=tmp_path / f"c.{ext}")) for ext in ("json", "yaml", "toml")}
    assert len(dumps) == 1
    (tmp_path / "c.ini").write_text("[model]\nnf = 16\n")
    with pytest.raises(ConfigError, match=r"\.toml \| \.yaml \| \.yml \| \.json"):
        build_config(config_file=tmp_path / "c.ini")


@pytest.mark.parametrize("source", ["override", "option", "file", "saved"])
def test_a_choice_is_checked_wherever_it_comes_from(source, tmp_path):
    message = r"loss\.gan: 'wgan' is not one of ragan \| vanilla \| none"
    with pytest.raises(ConfigError, match=message):
        if source == "override":
            build_config(overrides=["loss.gan=wgan"])
        elif source == "option":
            build_config(options={"loss.gan": "wgan"})
        elif source == "file":
            (tmp_path / "c.yaml").write_text("loss:\n  gan: wgan\n")
            build_config(config_file=tmp_path / "c.yaml")
        else:
            saved = build_config().to_dict()
            saved["loss"]["gan"] = "wgan"
            config_from_dict(saved)


def test_choices_set_in_python_are_checked_by_validate():
    config = Config()
    config.train.best_metric = "lpips"
    with pytest.raises(ConfigError, match=r"train\.best_metric: 'lpips' is not one of psnr \| ssim \| identity"):
        config.validate()
    with pytest.raises(ConfigError, match="preset: 'nope'"):
        build_config("nope")


def test_types_are_converted_from_strings():
    config = build_config(overrides=["train.progress=no", "loss.perceptual_layers=conv1_2, conv5_4",
                                     "optim.decay_every=1e3", "loss.adversarial=0.5"])
    assert config.train.progress is False
    assert config.loss.perceptual_layers == ["conv1_2", "conv5_4"]
    assert config.optim.decay_every == 1000 and isinstance(config.optim.decay_every, int)
    assert config.loss.resolved_weights().adversarial == 0.5
    with pytest.raises(ConfigError, match="cannot read 'maybe' as bool"):
        build_config(overrides=["train.progress=maybe"])
    with pytest.raises(ConfigError, match=r"cannot read 2\.5 as int"):
        build_config(options={"train.steps": 2.5})


def test_merge_options_is_the_one_merge_path_of_fresh_and_resumed_runs():
    options = {"train.steps": 7, "loss.margin": 0.4, "train.seed": None}
    overrides = ["optim.lr=1e-4"]
    fresh = build_config("srcnn", options=options, overrides=overrides)
    resumed = merge_options(config_from_dict(yaml.safe_load(dump_config(build_config("srcnn")))), options, overrides)
    assert dump_config(fresh) == dump_config(resumed)
    assert (fresh.train.steps, fresh.loss.margin, fresh.train.seed, fresh.optim.lr_d) == (7, 0.4, 0, 1e-4)


def test_train_cli_lists_choices_and_keeps_the_old_margin_name(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--id-margin" in shown and "--margin " not in shown and "ipfsrgan|esrgan|srgan|srcnn" in shown
    bad = runner.invoke(app, ["train", str(tmp_path), "--preset", "wgan"])
    assert bad.exit_code == 2
    for flag in ("--id-margin", "--margin"):  # both parse; the missing config file is the error
        result = runner.invoke(app, ["train", str(tmp_path), flag, "0.3", "--config", str(tmp_path / "none.toml")])
        assert result.exit_code == 2 and "config file not found" in result.output


# --- the one identity stack ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """Two photos each of two people: (4, 3, 128, 128) in [0, 1]."""
    names = ["Colin_Powell/Colin_Powell_0007.jpg", "Colin_Powell/Colin_Powell_0040.jpg",
             "Serena_Williams/Serena_Williams_0001.jpg", "Serena_Williams/Serena_Williams_0003.jpg"]
    return torch.stack([lfw_centre_face(LFW_DIR / n) for n in names])


def test_training_and_evaluation_share_one_identity_stack(faces):
    compute = Compute.create("cpu", "fp32", batch_size=3)  # 4 faces: two batches
    model = create_face_model("dlib", compute=compute)
    assert IdentityFeatures is IdentityEmbedder and isinstance(FaceEmbedder(model, compute), IdentityEmbedder)
    embedder = IdentityEmbedder(model)
    assert embedder.compute is compute and not any(p.requires_grad for p in embedder.parameters())
    with torch.no_grad():
        raw = embedder.raw(faces)
        unit = embedder.embed(faces)
    batched = embedder.embed_batched(faces)
    assert batched.device.type == "cpu" and torch.allclose(batched, raw, atol=1e-5)
    assert torch.allclose(unit.norm(dim=1), torch.ones(4), atol=1e-5)
    scores = embedder.compare(batched[[0, 0]], batched[[1, 2]])
    distance, cosine = scores["distance"], scores["cosine"]
    # dlib's rule: the same person below 0.6, different people above it; cosine agrees
    assert distance[0] < 0.6 < distance[1] and cosine[0] > cosine[1]
    assert abs(cosine[0] - float((unit[0] * unit[1]).sum())) < 1e-5


def test_one_entry_point_for_face_models():
    assert load_face_model.__doc__ and "create_face_model" in load_face_model.__doc__
    with pytest.raises(FaceModelError, match="unknown face model 'facenet'"):
        load_face_model("facenet", None, Compute.default())
    assert create_face_model("dlib").compute.device.type == "cpu"  # no compute: Compute.default()
