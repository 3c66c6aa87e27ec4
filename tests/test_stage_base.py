"""The one Stage base: checkpoints read once with weights_only=True, rebuilt from their saved config, weights loaded
strictly with errors naming the file and keys, eval mode on `map_location`, frozen helpers outside the state dict."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import randomise_unet
from test_ldm import make_ldm

from lit_diffusion.stages.base import CheckpointError, Stage
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.vae import VAEModule


def save(module: L.LightningModule, path: Path) -> Path:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def edited(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def test_every_stage_is_a_stage_of_its_kind():
    assert [(cls.stage_kind, issubclass(cls, Stage)) for cls in (CLIPModule, VAEModule, LatentDiffusionModule)] == [
        ("clip", True), ("vae", True), ("ldm", True)]


def test_building_the_diffusion_stage_reads_each_stage_file_once(tiny_ckpts, monkeypatch):
    reads = []
    load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f).name)
        assert kwargs.get("weights_only") is True
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    make_ldm(tiny_ckpts)
    assert sorted(reads) == ["clip.ckpt", "vae.ckpt"]


def test_saved_hparams_are_filtered_by_the_init_signature(tiny_ckpts, tmp_path):
    # LightningCLI stores keys of its own beside the init arguments; a key a later version dropped is ignored too
    def add_keys(ckpt):
        ckpt["hyper_parameters"].update(_class_path="lit_diffusion.stages.vae.VAEModule", _instantiator="x",
                                        dropped_option=1)

    path = edited(tiny_ckpts["vae"], tmp_path / "cli.ckpt", add_keys)
    loaded, reference = VAEModule.from_checkpoint(path), VAEModule.from_checkpoint(tiny_ckpts["vae"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), reference.encode(images), rtol=0, atol=0)


def test_weights_that_do_not_match_are_named_with_the_file_and_keys(tiny_ckpts, tmp_path):
    def extra(ckpt):
        ckpt["state_dict"]["vae.extra.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"extra\.ckpt: the vae weights do not match its config \(missing \[\], "
                                              r"unexpected \['vae\.extra\.weight'\]\)"):
        VAEModule.from_checkpoint(edited(tiny_ckpts["vae"], tmp_path / "extra.ckpt", extra))

    def reshaped(ckpt):
        ckpt["state_dict"]["vae.decoder.conv_out.weight"] = torch.zeros(1, 2, 3)

    with pytest.raises(CheckpointError, match=r"reshaped\.ckpt: the vae weights do not match its config: "
                                              r"size mismatch for vae\.decoder\.conv_out\.weight"):
        VAEModule.from_checkpoint(edited(tiny_ckpts["vae"], tmp_path / "reshaped.ckpt", reshaped))

    def newer(ckpt):
        ckpt["lit_diffusion"]["version"] = 99

    with pytest.raises(CheckpointError, match=r"newer\.ckpt was written by a newer lit_diffusion \(version 99\)"):
        CLIPModule.from_checkpoint(edited(tiny_ckpts["clip"], tmp_path / "newer.ckpt", newer))


def test_diffusion_checkpoint_loads_strictly_and_names_a_bad_embedded_stage(tiny_ckpts, tmp_path):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    path = save(model, tmp_path / "ldm.ckpt")
    key = next(k for k in model.state_dict() if k.startswith("unet."))

    def drop_unet_weight(ckpt):
        del ckpt["state_dict"][key]

    with pytest.raises(CheckpointError, match=rf"no-unet\.ckpt: the ldm weights do not match its config \(missing "
                                              rf"\['{key}'\], unexpected \[\]\)"):
        LatentDiffusionModule.from_checkpoint(edited(path, tmp_path / "no-unet.ckpt", drop_unet_weight))

    def wider_clip(ckpt):  # the embedded CLIP's config no longer fits its weights
        ckpt["lit_diffusion"]["frozen"]["clip"]["lit_diffusion"]["config"]["embed_dim"] += 1

    with pytest.raises(CheckpointError, match=r"wide\.ckpt: cannot rebuild the ldm stage from its saved config: "
                                              r"embedded clip checkpoint: the clip weights do not match its config: "
                                              r"size mismatch for model\.visual\.proj"):
        LatentDiffusionModule.from_checkpoint(edited(path, tmp_path / "wide.ckpt", wider_clip))


def test_from_checkpoint_gives_eval_mode_on_map_location_frozen_stages_included(tiny_ckpts, tmp_path):
    model = make_ldm(tiny_ckpts)
    path = save(model, tmp_path / "ldm.ckpt")
    loaded = LatentDiffusionModule.from_checkpoint(path, map_location="meta")  # any device but the CPU will do
    assert loaded.device.type == "meta" and not loaded.training
    assert {t.device.type for t in (*loaded.parameters(), *loaded.buffers())} == {"meta"}
    assert not loaded.clip.training and not loaded.vae.training
    assert not any(p.requires_grad for p in (*loaded.clip.parameters(), *loaded.vae.parameters()))
    assert all(p.requires_grad for p in loaded.unet.parameters())


def test_helpers_move_with_the_stage_but_stay_out_of_its_state_and_parameters():
    module = VAEModule(arch=dict(base_channels=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4,
                                 mid_attention=False, norm_groups=4))
    probe = module.add_helper("probe", torch.nn.Linear(2, 2))
    assert not probe.training and not probe.weight.requires_grad
    module.double()
    assert probe.weight.dtype == torch.float64
    module.to("meta")
    assert probe.weight.device.type == "meta"
    assert not any(k.startswith(("_aux", "probe")) for k in module.state_dict())
    assert all(p is not probe.weight for p in module.parameters())  # so DDP and the optimizer never see it
