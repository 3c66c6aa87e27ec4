"""Resolution progression: the diffusion stage trains in phases (`stages.ldm.phases`), each a `fit` that starts from
the previous phase's finished checkpoint (`LatentDiffusionModule(init_from=...)`: the denoiser's weights only), with
its own run directory, finished checkpoint and fingerprint; the last phase's is runs/NAME/ldm.ckpt."""

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging
from conftest import TINY_DIT, TINY_UNET
from test_pipeline import _changed, fake_run, tiny_pipeline  # noqa: F401 (fake_run: a fixture, with FakeFit)

from lit_diffusion import pipeline
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.latents import state_dict_hash
from lit_diffusion.diffusion.flow import resolution_shift
from lit_diffusion.metrics.features import file_sha256
from lit_diffusion.stages.base import CheckpointError
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.registry import STAGES

INIT_FROM = "model.init_args.init_from"
IMAGE_DATA = "lit_diffusion.data.datamodule.ImageCaptionDataModule"
PHASES = [{"name": "ldm_8", "args": {"trainer.max_steps": 4, "model.init_args.image_size": 8}},
          {"name": "ldm_16", "args": {"trainer.max_steps": 2}}]


# ---- the pipeline with faked stage runs (test_pipeline.FakeFit) ----
@pytest.fixture
def phased(fake_run):
    fake_run.cfg["stages"]["ldm"]["phases"] = copy.deepcopy(PHASES)
    fake_run.cfg["stages"]["ldm"]["args"]["model.init_args.lr"] = 5e-4  # every phase gets the stage's args
    return fake_run


def _command(run_dir) -> dict:
    """The `--key value` pairs a faked fit ran with (FakeFit writes its argv into last.ckpt)."""
    argv = json.loads((run_dir / "checkpoints" / "last.ckpt").read_text())
    return dict(zip(argv[4::2], argv[5::2]))


def _rm(message: str) -> None:
    """Does what a StageInputsChanged message says: rm -r PATHS."""
    for path in message.split("rm -r ")[1].split(";")[0].split():
        p = Path(path)
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_each_phase_is_a_fit_started_from_the_previous_phases_checkpoint(phased):
    root = phased.root
    results = phased.run()
    assert [c[0] for c in phased.fit.calls] == ["clip", "vae", "ldm_8", "ldm_16"]
    first, second = _command(root / "ldm_8"), _command(root / "ldm_16")
    assert first["--run.name"] == "ldm_8" and second["--run.name"] == "ldm_16"
    assert "--" + INIT_FROM not in first and second["--" + INIT_FROM] == str(root / "ldm_8.ckpt")
    # the phase's args on top of the stage's (trainer.max_steps: 6 there), the stage's in every phase
    assert (first["--trainer.max_steps"], second["--trainer.max_steps"]) == ("4", "2")
    assert first["--model.init_args.image_size"] == "8" and "--model.init_args.image_size" not in second
    assert first["--model.init_args.lr"] == second["--model.init_args.lr"] == "0.0005"
    assert first["--model.init_args.vae_ckpt"] == second["--model.init_args.vae_ckpt"] == str(root / "vae.ckpt")
    # each phase's finished checkpoint; the last one's is the stage's
    assert (root / "ldm_8.ckpt").read_bytes() == (root / "ldm_8" / "checkpoints" / "last.ckpt").read_bytes()
    assert (root / "ldm.ckpt").read_bytes() == (root / "ldm_16" / "checkpoints" / "last.ckpt").read_bytes()
    assert not (root / "ldm_16.ckpt").exists() and not (root / "ldm").exists()
    # the fingerprints record the chain: the second phase's holds the first's checkpoint by content
    made_1 = json.loads((root / "ldm_8.fingerprint.json").read_text())
    made_2 = json.loads((root / "ldm.fingerprint.json").read_text())
    assert INIT_FROM not in made_1["overrides"] and made_1["overrides"]["trainer.max_steps"] == 4
    assert made_2["overrides"][INIT_FROM] == str(root / "ldm_8.ckpt")
    assert made_2["files"][INIT_FROM] == file_sha256(root / "ldm_8.ckpt")
    assert made_2 == json.loads((root / "ldm_16" / "fingerprint.json").read_text())
    assert results["ldm"]["ckpt"] == str(root / "ldm.ckpt") and not results["ldm"]["skipped"]
    assert [(p["name"], p["init_from"], p["ckpt"]) for p in results["ldm"]["phases"]] == [
        ("ldm_8", None, str(root / "ldm_8.ckpt")), ("ldm_16", str(root / "ldm_8.ckpt"), str(root / "ldm.ckpt"))]
    again = phased.run()
    assert len(phased.fit.calls) == 4 and again["ldm"]["skipped"]
    assert [p["skipped"] for p in again["ldm"]["phases"]] == [True, True]


def test_a_changed_phase_stops_the_run_naming_it_and_the_phases_after_it(phased):
    root = phased.root
    phased.run()
    phases = phased.cfg["stages"]["ldm"]["phases"]
    phases[1]["args"]["trainer.max_steps"] = 3
    message = _changed(phased, f"[ldm_16] {root / 'ldm.ckpt'} was made with other inputs",
                       "override --trainer.max_steps: 2 -> 3", "To retrain ldm_16 with the new inputs",
                       f"rm -r {root / 'ldm.ckpt'} {root / 'ldm.fingerprint.json'} {root / 'ldm_16'};")
    assert "ldm_8" not in message
    phases[1]["args"]["trainer.max_steps"] = 2
    phases[0]["args"]["trainer.max_steps"] = 5
    message = _changed(phased, f"[ldm_8] {root / 'ldm_8.ckpt'} was made with other inputs",
                       "override --trainer.max_steps: 4 -> 5", "To retrain ldm_8 and ldm_16 with the new inputs",
                       f"rm -r {root / 'ldm_8.ckpt'} {root / 'ldm_8.fingerprint.json'} {root / 'ldm_8'} "
                       f"{root / 'ldm.ckpt'} {root / 'ldm.fingerprint.json'} {root / 'ldm_16'};")
    assert "[clip]" not in message and "[vae]" not in message
    old = json.loads((root / "ldm.fingerprint.json").read_text())["files"][INIT_FROM]
    _rm(message)  # doing what it says retrains both phases, the second from the new first
    phased.run()
    assert phased.fit.calls[4:] == [("ldm_8", None), ("ldm_16", None)]
    new = json.loads((root / "ldm.fingerprint.json").read_text())["files"][INIT_FROM]
    assert new == file_sha256(root / "ldm_8.ckpt") != old


def test_a_replaced_or_missing_earlier_phase_makes_the_later_one_stale(phased):
    root = phased.root
    phased.run()
    (root / "ldm_8.ckpt").write_text("a first phase trained elsewhere")
    _changed(phased, f"[ldm_16] {root / 'ldm.ckpt'} was made with other inputs",
             f"file --{INIT_FROM}: {root / 'ldm_8.ckpt'} has other content")
    (root / "ldm_8.ckpt").unlink()
    shutil.rmtree(root / "ldm_8")
    _changed(phased, f"[ldm_16] {root / 'ldm.ckpt'} was made from a ldm_8.ckpt that is missing")


def test_a_finished_stage_without_phases_is_not_taken_for_the_last_phase(fake_run):
    fake_run.run()
    fake_run.cfg["stages"]["ldm"]["phases"] = copy.deepcopy(PHASES)
    root = fake_run.root
    _changed(fake_run, f"[ldm_16] {root / 'ldm.ckpt'} was made from a ldm_8.ckpt that is missing",
             f"rm -r {root / 'ldm.ckpt'} {root / 'ldm.fingerprint.json'};")


@pytest.mark.parametrize("failing", ["ldm_8", "ldm_16"])
def test_an_interrupted_phase_resumes_from_its_own_last_ckpt(phased, failing):
    root = phased.root
    phased.fit.fail = {failing}
    with pytest.raises(RuntimeError, match=f"stage {failing} failed"):
        phased.run()
    assert not (root / "ldm.ckpt").exists() and (root / failing / "fingerprint.json").is_file()
    assert (root / "ldm_8.ckpt").is_file() == (failing == "ldm_16")
    phased.fit.fail = set()
    phased.run()
    last = str(root / failing / "checkpoints" / "last.ckpt")
    done = [("clip", None), ("vae", None), ("ldm_8", None)]
    then = [("ldm_16", None), ("ldm_16", last)] if failing == "ldm_16" else [("ldm_8", last), ("ldm_16", None)]
    assert phased.fit.calls == done + then
    # the resumed command names init_from too: Lightning restores last.ckpt after the module's __init__ loaded it
    # (test_a_resumed_phase_continues_its_checkpoint_not_init_from)
    assert _command(root / "ldm_16")["--" + INIT_FROM] == str(root / "ldm_8.ckpt")
    assert json.loads((root / "ldm.fingerprint.json").read_text())["files"][INIT_FROM] == file_sha256(
        root / "ldm_8.ckpt")


def test_an_interrupted_phase_with_other_inputs_is_not_resumed(phased):
    root = phased.root
    phased.fit.fail = {"ldm_16"}
    with pytest.raises(RuntimeError, match="stage ldm_16 failed"):
        phased.run()
    phased.fit.fail = set()
    phased.cfg["stages"]["ldm"]["phases"][1]["args"]["model.init_args.lr"] = 1e-4
    _changed(phased, f"[ldm_16] the interrupted run {root / 'ldm_16' / 'checkpoints' / 'last.ckpt'} was started "
                     "with other inputs", "override --model.init_args.lr: 0.0005 -> 0.0001",
             f"rm -r {root / 'ldm_16'};")


def _config_with(tmp_path, ldm: dict):
    cfg = yaml.safe_load(open("configs/pipeline/shapes_progression.yaml"))
    cfg["stages"]["ldm"] = ldm
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("ldm, message", [
    ({"config": "c.yaml", "phases": []}, r"stages\.ldm\.phases must be a list of \{name: NAME, args"),
    ({"config": "c.yaml", "phases": [{"name": "a", "steps": 3}]}, r"phases\[0\]: a phase is \{name: NAME, args"),
    ({"config": "c.yaml", "phases": [{"name": "a"}, {"name": "a"}]}, r"phases\[1\]: name 'a': each phase needs its "
                                                                     r"own name"),
    ({"config": "c.yaml", "phases": [{"name": "ldm"}]}, r"phases\[0\]: name 'ldm': .*not one of \['clip', 'vae', "
                                                        r"'prior', 'ldm', 'eval', 'latents'\]"),
    ({"config": "c.yaml", "phases": [{"name": "a/b"}]}, r"name 'a/b'"),
    ({"config": "c.yaml", "phases": [{"name": "a"}, {"name": "b", "args": {INIT_FROM: "x.ckpt"}}]},
     r"phases\[1\] \(b\): model\.init_args\.init_from is set by the pipeline"),
    ({"config": "c.yaml", "args": {INIT_FROM: "x.ckpt"}, "phases": [{"name": "a"}]},
     r"stages\.ldm\.args sets model\.init_args\.init_from.*give it in the first phase's args"),
])
def test_malformed_phases_are_refused_naming_the_key(tmp_path, ldm, message):
    with pytest.raises(ValueError, match=message):
        pipeline.load_config(_config_with(tmp_path, ldm))


def test_only_the_diffusion_stage_has_phases(tmp_path):
    cfg = yaml.safe_load(open("configs/pipeline/shapes_progression.yaml"))
    cfg["stages"]["vae"]["phases"] = [{"name": "vae_a"}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"stages\.vae\.phases: only the diffusion stage \(stages\.ldm\)"):
        pipeline.load_config(tmp_path / "p.yaml")
    pipeline.load_config(_config_with(tmp_path, {"config": "c.yaml", "phases": [  # first phase from elsewhere: fine
        {"name": "a", "args": {INIT_FROM: "x.ckpt"}}, {"name": "b"}]}))


# ---- configs/pipeline/shapes_progression.yaml ----
def test_the_progression_config_is_the_previous_main_job_in_two_resolutions():
    main = pipeline.load_config("configs/pipeline/shapes_flow.yaml")  # the main job before REPA (README)
    prog = pipeline.load_config("configs/pipeline/shapes_progression.yaml")
    for key in ("root", "seed", "wandb", "data", "evaluation", "samples"):
        assert prog[key] == main[key], key
    assert prog["stages"]["clip"] == main["stages"]["clip"] and prog["stages"]["vae"] == main["stages"]["vae"]
    assert prog["stages"]["ldm"]["config"] == main["stages"]["ldm"]["config"] == "configs/ldm/shapes_flow.yaml"
    assert "encode" in main and "encode" not in prog  # 24 px latents are not in 32 px latent shards
    assert prog["stages"]["ldm"]["args"] == {"data.class_path": IMAGE_DATA}
    stage = yaml.safe_load(open(main["stages"]["ldm"]["config"]))
    phases = [p["args"] for p in prog["stages"]["ldm"]["phases"]]
    assert [p["name"] for p in prog["stages"]["ldm"]["phases"]] == ["ldm_24", "ldm_32"]
    assert sum(p["trainer.max_steps"] for p in phases) == stage["trainer"]["max_steps"] == 2500
    sizes = [p["model.init_args.image_size"] for p in phases]
    assert sizes == [p["data.init_args.image_size"] for p in phases] == [24, 32]
    assert sizes[-1] == main["data"]["size"] == stage["model"]["init_args"]["image_size"]
    # SD3's shift per resolution, relative to shapes_flow's 32 px at its shift: the last phase is shapes_flow's
    flow = stage["model"]["init_args"]["flow"]
    assert [p["model.init_args.flow"] for p in phases] == [
        {**flow, "shift": flow["shift"] * resolution_shift(s, 32)} for s in sizes]
    assert [p["model.init_args.flow"]["shift"] for p in phases] == [0.75, 1.0]
    assert phases[1]["model.init_args.flow"]["shift"] / phases[0]["model.init_args.flow"]["shift"] == \
        pytest.approx(resolution_shift(32, 24))


def _parse(argv: list[str], monkeypatch):
    from lit_diffusion.runtime.lightning_cli import LitDiffusionCLI

    class ParseOnly(LitDiffusionCLI):
        def instantiate_classes(self):
            pass

    monkeypatch.setattr(sys, "argv", ["lit-diffusion"])
    return ParseOnly(args=argv, run=False).config


def test_the_progression_phases_parse_as_lightning_reads_them(tmp_path, monkeypatch):
    cfg = pipeline.load_config("configs/pipeline/shapes_progression.yaml")
    root = tmp_path / "runs" / "shapes_progression"
    data = {"train_urls": "data/shapes/train-*.tar", "val_urls": "data/shapes/val-*.tar",
            "tokenizer": "data/shapes/tokenizer.json"}
    extras = {"clip": {}, "vae": {}, "ldm": {"model.init_args.clip_ckpt": str(root / "clip.ckpt"),
                                             "model.init_args.vae_ckpt": str(root / "vae.ckpt")}}
    pipeline.check_stage_data(cfg, {s: data for s in STAGES}, extras)  # the image data module takes every key
    steps = [s for s in pipeline.training_steps(cfg, root) if s.stage == "ldm"]
    assert [(s.name, s.final, s.init_from) for s in steps] == [("ldm_24", "ldm_24", None),
                                                               ("ldm_32", "ldm", str(root / "ldm_24.ckpt"))]
    stage = yaml.safe_load(open(cfg["stages"]["ldm"]["config"]))
    for step, size, shift, steps_ in zip(steps, (24, 32), (0.75, 1.0), (1500, 1000)):
        overrides = pipeline.stage_overrides("ldm", cfg, data, pipeline._step_extra(step, extras), step.args)
        argv = ["--config", cfg["stages"]["ldm"]["config"]] + [a for k, v in overrides.items()
                                                                for a in pipeline._arg(k, v)]
        parsed = _parse(argv, monkeypatch)
        assert parsed["data"]["class_path"] == IMAGE_DATA
        args = parsed["data"]["init_args"]
        assert (args["image_size"], args["train_urls"], args["val_urls"]) == (size, *list(data.values())[:2])
        assert args["batch_size"] == stage["data"]["init_args"]["batch_size"] == 64
        model = parsed["model"]["init_args"]
        assert (model["image_size"], model["flow"]["shift"], model["init_from"]) == (size, shift, step.init_from)
        assert model["flow"]["timesteps"] == "logit_normal" and model["objective"] == "flow"
        assert parsed["trainer"]["max_steps"] == steps_


def test_a_24px_phase_cannot_read_the_32px_latent_shards(tmp_path):
    """Why the progression config has no `encode:`: with it, the latent data module refuses the phase's size."""
    cfg = pipeline.load_config("configs/pipeline/shapes_progression.yaml")
    cfg["encode"] = {}
    cfg["stages"]["ldm"]["args"] = {}
    (tmp_path / "train-000000.tar").touch()  # a name only: latent_data counts the shards
    data = {"train_urls": str(tmp_path / "train-*.tar"), "tokenizer": "t.json"}
    inputs = {s: data for s in STAGES}
    inputs["ldm"] = pipeline.latent_data(cfg, tmp_path, data)
    extras = {s: {} for s in STAGES}
    with pytest.raises(pipeline.PipelineConfigError, match=r"stages\.ldm phase ldm_24 \(configs/ldm/shapes_flow\.yaml"
                                                           r"\): the pipeline passes data\.init_args\.image_size, "
                                                           r"which LatentDataModule does not take"):
        pipeline.check_stage_data(cfg, inputs, extras)


def test_the_shapes_unet_trains_at_24px(tiny_ckpts):
    """The main job's U-Net (one downsampling, attention at both levels, sin-cos positions) on 6x6 latents."""
    unet = yaml.safe_load(open("configs/ldm/shapes_flow.yaml"))["model"]["init_args"]["unet"]
    model = _ldm(tiny_ckpts, image_size=24, unet=unet, pooled_text=True, objective="flow", sampler="heun")
    assert model.latent_shape() == (6, 6)
    batch = {"image": torch.rand(4, 3, 24, 24) * 2 - 1, "caption": ["a large red circle"] * 4}
    loss = model.model_step(batch, train=True)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)


# ---- LatentDiffusionModule(init_from=...) ----
def _ldm(tiny_ckpts, seed: int = 0, **kwargs) -> LatentDiffusionModule:
    torch.manual_seed(seed)
    args = dict(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]), image_size=16, unet=TINY_UNET,
                sample_steps=2, warmup_steps=0, lr=1e-3)
    return LatentDiffusionModule(**{**args, **kwargs})


def _train(module, tiny_ckpts, size: int, steps: int, root, callbacks=(), ckpt_path=None) -> L.Trainer:
    data = ImageCaptionDataModule(train_urls=str(tiny_ckpts["data"] / "train-*.tar"), image_size=size, batch_size=8,
                                  num_workers=0, train_batches_per_epoch=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(root), callbacks=list(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _unet(state: dict) -> dict:
    return {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def first_phase(tiny_ckpts, tmp_path_factory):
    """A first phase at 8 px with an EMA updated every step, saved at the end of training as the pipeline's
    last.ckpt is: the frozen encoders inside it are the EMA's rounded copies."""
    root = tmp_path_factory.mktemp("first_phase")
    trainer = _train(_ldm(tiny_ckpts, image_size=8), tiny_ckpts, 8, 3, root,
                     callbacks=[EMAWeightAveraging(decay=0.9)])
    trainer.save_checkpoint(root / "ldm_8.ckpt")
    return root / "ldm_8.ckpt"


def test_init_from_starts_the_denoiser_from_the_earlier_checkpoint(first_phase, tiny_ckpts, tmp_path):
    ckpt = torch.load(first_phase, map_location="cpu", weights_only=True)
    clip = CLIPModule.from_checkpoint(tiny_ckpts["clip"]).state_dict()
    rounded = {k.removeprefix("clip."): v for k, v in ckpt["current_model_state"].items() if k.startswith("clip.")}
    assert state_dict_hash(rounded) != state_dict_hash(clip)  # the EMA's rounding: the check must still accept it
    earlier = tmp_path / "earlier.ckpt"
    shutil.copy(first_phase, earlier)
    fresh = _ldm(tiny_ckpts, seed=1)
    model = _ldm(tiny_ckpts, seed=1, init_from=str(earlier))  # 16 px from 8 px: the same weights serve both
    want = _unet(ckpt["state_dict"])  # what the earlier phase samples with: its EMA copy
    assert _equal(model.unet.state_dict(), want) and not _equal(fresh.unet.state_dict(), want)
    assert state_dict_hash(model.clip.state_dict()) == state_dict_hash(clip)  # its own encoders, not the copies
    assert not _equal(model.clip.state_dict(), rounded)
    # a new phase: nothing but the weights (step 0, its own optimizer); and not a hyper-parameter, so its own
    # checkpoint rebuilds without the earlier file
    assert "init_from" not in model.hparams
    trainer = _train(model, tiny_ckpts, 16, 1, tmp_path)
    assert trainer.global_step == 1
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    earlier.unlink()
    rebuilt = LatentDiffusionModule.from_checkpoint(tmp_path / "ldm.ckpt")
    assert rebuilt.hparams.image_size == 16 and _equal(rebuilt.unet.state_dict(), model.unet.state_dict())


def test_init_from_refuses_what_does_not_fit_naming_the_file(first_phase, tiny_ckpts, tmp_path):
    first = re.escape(str(first_phase))
    with pytest.raises(CheckpointError, match=r"init_from: ldm checkpoint not found: .*nowhere\.ckpt"):
        _ldm(tiny_ckpts, init_from=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(CheckpointError, match=r"init_from: .*vae\.ckpt is a 'vae' checkpoint, expected a 'ldm'"):
        _ldm(tiny_ckpts, init_from=str(tiny_ckpts["vae"]))
    with pytest.raises(CheckpointError, match=rf"init_from: {first}: its unet weights do not match this stage's "
                                              r"config \(missing \[\], unexpected \[\], other shapes \[.*'input_blocks"
                                              r"\.0\.0\.weight \(16, 4, 3, 3\) \(here \(8, 4, 3, 3\)\)'"):
        _ldm(tiny_ckpts, init_from=str(first_phase), unet={**TINY_UNET, "model_channels": 8})
    with pytest.raises(CheckpointError, match=rf"init_from: {first}: its unet weights do not match .*missing \['"):
        _ldm(tiny_ckpts, init_from=str(first_phase), unet={**TINY_UNET, "channel_mult": [1, 2, 2]})
    with pytest.raises(CheckpointError, match=rf"{first} holds no dit\.\* weights \(its denoiser: unet\), and "
                                              r"this stage trains a dit"):
        _ldm(tiny_ckpts, init_from=str(first_phase), unet=None, dit=TINY_DIT)


def test_init_from_refuses_a_checkpoint_of_other_frozen_encoders(first_phase, tiny_ckpts, tmp_path):
    ckpt = torch.load(first_phase, map_location="cpu", weights_only=True)
    for name in ("clip", "vae"):
        other = copy.deepcopy(ckpt)
        for state in (other["state_dict"], other["current_model_state"]):
            key = next(k for k, v in state.items() if k.startswith(name + ".") and v.is_floating_point()
                       and v.ndim > 1 and v.abs().sum() > 0)
            state[key] = state[key] * 1.01  # another encoder: not a rounding apart
        torch.save(other, tmp_path / f"other_{name}.ckpt")
        ours = {"clip": CLIPModule.from_checkpoint(tiny_ckpts["clip"]).state_dict(),
                "vae": _ldm(tiny_ckpts).vae.state_dict()}[name]
        given = re.escape(str(tiny_ckpts[name]))
        with pytest.raises(CheckpointError, match=rf"init_from: .*other_{name}\.ckpt was trained with another frozen "
                                                  rf"{name} \(state_dict_hash [0-9a-f]{{16}}\) than this stage's "
                                                  rf"{given} \({state_dict_hash(ours)[:16]}\)"):
            _ldm(tiny_ckpts, init_from=str(tmp_path / f"other_{name}.ckpt"))


class StartWeights(L.Callback):
    """The denoiser's weights that the first training step of this fit starts from (after every setup and restore
    hook, the module's `on_train_start` included)."""

    weights = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.weights is None:
            self.weights = {k: v.clone() for k, v in pl_module.unet.state_dict().items()}


def test_a_resumed_phase_continues_its_checkpoint_not_init_from(first_phase, tiny_ckpts, tmp_path):
    """As LightningCLI runs `fit --ckpt_path last.ckpt`: the module is built (init_from loaded in __init__), then
    `trainer.fit(model, ckpt_path=...)` restores the checkpoint over it."""
    interrupted = _ldm(tiny_ckpts, init_from=str(first_phase))
    trainer = _train(interrupted, tiny_ckpts, 16, 2, tmp_path / "a")
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = _unet(torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    earlier = _unet(torch.load(first_phase, map_location="cpu", weights_only=True)["state_dict"])
    assert not _equal(saved, earlier)  # it trained two steps away from where it started
    resumed, start = _ldm(tiny_ckpts, init_from=str(first_phase)), StartWeights()
    assert _equal(resumed.unet.state_dict(), earlier)  # before fit: init_from's
    trainer = _train(resumed, tiny_ckpts, 16, 3, tmp_path / "b", callbacks=[start], ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 3
    assert _equal(start.weights, saved) and not _equal(start.weights, earlier)


# ---- real runs ----
@pytest.mark.slow
def test_a_killed_phase_resumes_through_the_cli_to_the_uninterrupted_phases_weights(tiny_ckpts, tmp_path):
    """`lit-diffusion fit` as the pipeline runs a phase: init_from on the command line, resumed with --ckpt_path
    after SIGKILL, ends bit for bit where the uninterrupted phase does; so the restored checkpoint won over
    init_from. The first phase's EMA (ours, a lerp, from step 0) keeps its frozen encoders bit-identical: their
    hash is clip.ckpt's (Lightning's own class rounds them: the tolerance test above)."""
    import signal

    from test_exact_resume import KILL_AT, assert_bit_identical, final_weights, ldm_config, one_process, run_args

    root = tmp_path / "runs"
    first = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "first"))
    assert first.returncode == 0, first.stderr[-3000:]
    embedded = torch.load(root / "first" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    averaged = {k.removeprefix("clip."): v for k, v in embedded["state_dict"].items() if k.startswith("clip.")}
    assert state_dict_hash(averaged) == state_dict_hash(CLIPModule.from_checkpoint(tiny_ckpts["clip"]).state_dict())
    init = ["--" + INIT_FROM, str(root / "first" / "checkpoints" / "last.ckpt")]
    whole = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "whole") + init)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, KILL_AT), root, "second") + init)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / "second" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4  # resumed half way
    resumed = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "second", resume=True) + init)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # from step 4 of the checkpoint (a rerun from init_from at step 0 would end with the same weights)
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr + resumed.stdout
    assert_bit_identical(final_weights(root, "whole"), final_weights(root, "second"))
    with pytest.raises(AssertionError, match="tensors differ"):  # init_from mattered: the first phase ends elsewhere
        assert_bit_identical(final_weights(root, "first"), final_weights(root, "whole"))


def tiny_progression(tmp_path, tiny_ckpts) -> dict:
    """tiny_pipeline (test_pipeline) with the given tiny CLIP and VAE, no `encode:`, and the diffusion stage in two
    phases of 3 steps on the image shards: 8 px, then 16 px from its weights (rectified flow, shift per size)."""
    cfg = tiny_pipeline(tmp_path)
    data = tiny_ckpts["data"]
    cfg.update(name="prog", data={"train_urls": str(data / "train-*.tar"), "val_urls": str(data / "val-*.tar"),
                                  "tokenizer": str(data / "tokenizer.json")})
    del cfg["encode"]
    cfg["evaluation"].update(sampler="euler", steps=2)
    cfg["samples"].update(sampler="euler", steps=2)
    cfg["stages"]["clip"] = {"checkpoint": str(tiny_ckpts["clip"])}
    cfg["stages"]["vae"] = {"checkpoint": str(tiny_ckpts["vae"])}
    ldm = cfg["stages"]["ldm"]
    ldm["config"] = "configs/ldm/shapes_flow.yaml"
    ldm["args"] = {"data.class_path": IMAGE_DATA, **{k: v for k, v in ldm["args"].items() if "image_size" not in k},
                   "model.init_args.sample_steps": 2}
    flow = {"timesteps": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    ldm["phases"] = [{"name": f"ldm_{px}", "args": {
        "data.init_args.image_size": px, "model.init_args.image_size": px, "trainer.max_steps": 3,
        "model.init_args.flow": {**flow, "shift": resolution_shift(px, 16)}}} for px in (8, 16)]
    # the first phase's EMA (the config's last callback) averages from its first step, so its checkpoint holds
    # trained weights (and rounded frozen encoders); the second's starts at step 100 as configured, so in 3 steps
    # its average follows the trained weights, which a learning rate of 0 keeps where the phase started
    ldm["phases"][0]["args"]["trainer.callbacks.update_starting_at_step"] = 0
    ldm["phases"][1]["args"]["model.init_args.lr"] = 0.0
    return cfg


@pytest.mark.slow
def test_a_tiny_two_phase_pipeline_trains_evaluates_and_reports_the_chain(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_progression(tmp_path, tiny_ckpts)
    path = tmp_path / "prog.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = pipeline.run_pipeline(path)["report"]
    root = tmp_path / "runs" / "prog"
    first, last = (torch.load(root / f, map_location="cpu", weights_only=True) for f in ("ldm_8.ckpt", "ldm.ckpt"))
    assert first["hyper_parameters"]["image_size"] == 8 and last["hyper_parameters"]["image_size"] == 16
    assert [c["lit_diffusion"]["schedule"]["shift"] for c in (first, last)] == [0.5, 1.0]
    assert "init_from" not in last["hyper_parameters"]
    # the second phase started from the first's weights: at learning rate 0 it kept them, and its average (no
    # update before step 100) follows them; the first's are 3 trained steps averaged, which no fresh
    # initialisation gives
    assert int(first["averaging_state"]["n_averaged"]) == 3 and int(last["averaging_state"]["n_averaged"]) == 0
    assert _equal(_unet(last["state_dict"]), _unet(first["state_dict"]))
    assert _equal(_unet(last["current_model_state"]), _unet(first["state_dict"]))
    config = yaml.safe_load((root / "ldm_16" / "config.yaml").read_text())
    assert config["model"]["init_args"]["init_from"] == str(root / "ldm_8.ckpt")
    assert config["data"]["class_path"] == IMAGE_DATA and config["data"]["init_args"]["image_size"] == 16
    assert yaml.safe_load((root / "ldm_8" / "config.yaml").read_text())["model"]["init_args"]["init_from"] is None
    for phase in ("ldm_8", "ldm_16"):
        rows = [json.loads(x) for x in (root / phase / "metrics.jsonl").read_text().splitlines()]
        assert max(r.get("step", -1) for r in rows if "train/loss" in r) >= 2, phase  # each phase trained
    made = json.loads((root / "ldm.fingerprint.json").read_text())
    assert made["files"][INIT_FROM] == file_sha256(root / "ldm_8.ckpt")
    # the report: the stage's figures and config are the last phase's, and it lists the chain
    ldm = out["stages"]["ldm"]
    assert ldm["ckpt"] == str(root / "ldm.ckpt") and ldm["config"]["model"]["init_args"]["image_size"] == 16
    assert [(p["name"], p["init_from"]) for p in ldm["phases"]] == [("ldm_8", None),
                                                                    ("ldm_16", str(root / "ldm_8.ckpt"))]
    md = (root / "report.md").read_text()
    assert "| ldm phase ldm_8 |" in md and "| ldm phase ldm_16 |" in md and "from `ldm_8.ckpt`, " in md
    assert out["evaluation"]["results"]["eval/caption_acc_g3.0"] is not None
    assert (root / "samples.png").is_file()
    # a rerun trains nothing; a changed first phase stops it, naming both phases' files
    again = pipeline.run_pipeline(path)["report"]
    assert again["stages"]["ldm"]["skipped"] and [p["skipped"] for p in again["stages"]["ldm"]["phases"]] == [True] * 2
    cfg["stages"]["ldm"]["phases"][0]["args"]["trainer.max_steps"] = 4
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline.StageInputsChanged, match=r"(?s)\[ldm_8\] .*trainer\.max_steps: 3 -> 4.*To retrain "
                                                          r"ldm_8 and ldm_16"):
        pipeline.run_pipeline(path)
