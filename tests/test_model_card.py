"""The model card of an exported folder (`export.card.write_model_card`) and its upload (`push_to_hub`).

The run folder is a small copy of a pipeline run's layout (runs/text_s2: report.json, report.md, samples.png,
STAGE.fingerprint.json, latents/manifest.json, ldm.ckpt), with a tiny ldm checkpoint holding the same
hyper-parameter layout as a real one (saved hyper-parameters, the `lit_diffusion` block with the frozen CLIP and VAE,
an EMA state). No network: the Hub API is a fake that records its calls.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from lit_diffusion.export import ExportError
from lit_diffusion.export.card import LICENSE_NAME, push_to_hub, write_model_card

GUIDANCE = [1.0, 3.0, 5.0]
RESULTS = {}
for i, g in enumerate(GUIDANCE):
    RESULTS.update({f"eval/fid_clip_g{g}": 0.009213651607997475 + i / 1000, f"eval/clip_score_g{g}": 85.99251764 + i,
                    f"eval/caption_acc_g{g}": 0.635 + i / 20,
                    **{f"eval_detail/caption_{k}_g{g}": 0.5 + i / 10 + j / 100 for j, k in enumerate(
                        ("count", "colors", "shapes", "sizes", "relation", "one_object", "two_objects"))}})
RESULTS.update({"eval/num_samples": 200.0, "eval/seconds": 82.8})
UNET = {"model_channels": 48, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1, 2],
        "head_dim": 24, "norm_groups": 16, "pos_embed": True, "context_layers": 2, "context_heads": 4}
FLOW = {"timesteps": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "shift": 1.0}
VAE_ARCH = {"in_channels": 3, "base_channels": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "z_channels": 4}


def tiny_ldm_checkpoint(path, run):
    """An ldm.ckpt as LatentDiffusionModule saves it (the parts a card reads), with a few small tensors."""
    hparams = {"_class_path": "lit_diffusion.stages.ldm.LatentDiffusionModule", "clip_ckpt": str(run / "clip.ckpt"),
               "vae_ckpt": str(run / "vae.ckpt"), "image_size": 32, "unet": UNET, "dit": None, "pooled_text": True,
               "condition": "text", "objective": "flow", "schedule": None, "flow": FLOW, "prediction": None,
               "loss_weighting": "plain", "min_snr_gamma": 5.0, "p_uncond": 0.1, "p_uncond_image": 0.1, "lr": 0.001,
               "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 100, "sampler": "heun",
               "sample_steps": 13, "guidance": 3.0, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    clip_hp = {"vision": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 3, "heads": 4},
               "text": {"vocab_size": 263, "context_length": 32, "eot_id": 1, "width": 96, "layers": 3, "heads": 4},
               "embed_dim": 64}
    block = {"kind": "ldm", "version": 1, "latent_size": 8, "latent_channels": 4, "objective": "flow",
             "schedule": {**FLOW, "time_scale": 1000.0, "base_latent": None}, "prediction": None,
             "frozen": {"clip": {"hyper_parameters": clip_hp, "lit_diffusion": {"kind": "clip", "version": 1}},
                        "vae": {"hyper_parameters": {"arch": VAE_ARCH},
                                "lit_diffusion": {"kind": "vae", "version": 1, "scale_factor": 0.598,
                                                  "latent_mean": 0.3546, "config": VAE_ARCH, "latent_channels": 4,
                                                  "downsample_factor": 4}}}}
    state = {"unet.conv_in.weight": torch.zeros(48, 4, 3, 3), "unet.conv_in.bias": torch.zeros(48),
             "clip.text.token_embedding.weight": torch.zeros(263, 4), "vae.decoder.conv_out.weight": torch.zeros(5)}
    torch.save({"epoch": 9, "global_step": 2500, "state_dict": state, "hyper_parameters": hparams,
                "lit_diffusion": block, "averaging_state": {"n_averaged": torch.tensor(2400)}}, path)
    return path


def stage_config(class_path, batch_size, callbacks=()):
    return {"seed_everything": 2, "trainer": {"devices": 1, "max_steps": 2500, "callbacks": list(callbacks)},
            "model": {"class_path": class_path, "init_args": {"init_from": None}},
            "data": {"class_path": "lit_diffusion.data.datamodule.LatentDataModule",
                     "init_args": {"batch_size": batch_size}}}


@pytest.fixture
def run_dir(tmp_path):
    """runs/tiny: a finished pipeline run's files, as runs/text_s2 holds them."""
    run = tmp_path / "runs" / "tiny"
    (run / "latents").mkdir(parents=True)
    tiny_ldm_checkpoint(run / "ldm.ckpt", run)
    Image.new("RGB", (12, 8), (200, 30, 30)).save(run / "samples.png")
    ema = {"class_path": "lit_diffusion.callbacks.ema.EMAWeightAveraging", "init_args": {"decay": 0.995}}
    report = {
        "name": "tiny",
        "data": {"train_urls": "/data/shapes/train-*.tar", "val_urls": "/data/shapes/val-*.tar",
                 "tokenizer": "/data/shapes/tokenizer.json", "made": True},
        "stages": {
            "clip": {"ckpt": str(run / "clip.ckpt"), "skipped": False, "seconds": 169.5,
                     "figures": {"val/i2t_r1": 0.874, "val/loss": 0.3965},
                     "config": stage_config("lit_diffusion.stages.clip.CLIPModule", 64)},
            "vae": {"ckpt": str(run / "vae.ckpt"), "skipped": True, "seconds": None, "figures": {"val/psnr": None},
                    "config": None},
            "ldm": {"ckpt": str(run / "ldm.ckpt"), "skipped": False, "seconds": 1750.4,
                    "figures": {"val/loss": 0.1024, "train/loss": 0.1281},
                    "config": stage_config("lit_diffusion.stages.ldm.LatentDiffusionModule", 64, [ema])}},
        "evaluation": {"results": RESULTS,
                       "config": {"guidance": GUIDANCE, "num_samples": 200, "backends": ["clip"], "sampler": "heun",
                                  "steps": 13, "seed": 0},
                       "json": str(run / "eval" / "eval_final.json"), "plot": None},
        "samples": str(run / "samples.png"),
        "timings_seconds": {"clip": 169.5, "vae": None, "ldm": 1750.4, "total": 2000.0},
        "pipeline_config": {"name": "tiny", "seed": 2, "data": {"out": "/data/shapes", "train": 5, "val": 2},
                            "stages": {"vae": {"checkpoint": "/elsewhere/vae.ckpt"}},
                            "samples": {"prompts": ["a large red circle", "a small blue square"],
                                        "negative_prompt": "a purple square", "guidance": [1, 3, 5]}},
    }
    (run / "report.json").write_text(json.dumps(report, indent=2))
    (run / "report.md").write_text("# lit_diffusion pipeline report: tiny\n")
    shards = [{"name": "train/000000.tar", "samples": 3, "source": "/data/shapes/train-000000.tar"},
              {"name": "train/000001.tar", "samples": 2, "source": "/data/shapes/train-000001.tar"},
              {"name": "val/000000.tar", "samples": 2, "source": "/data/shapes/val-000000.tar"}]
    (run / "latents" / "manifest.json").write_text(json.dumps({
        "format": "lit_diffusion.latents", "version": 1, "image_size": 32, "dtype": "float32", "samples": 7,
        "shapes": {"latent": [4, 8, 8]}, "shards": shards,
        "splits": {"train": ["train/000000.tar", "train/000001.tar"], "val": ["val/000000.tar"]}}))
    (run / "ldm.fingerprint.json").write_text(json.dumps({
        "config": {"model": {"init_args": {"objective": "flow", "unet": UNET}}}, "config_file": "configs/ldm/x.yaml",
        "seed": 2, "overrides": {"model.init_args.clip_ckpt": str(run / "clip.ckpt")}}))
    return run


def exported(tmp_path, files=("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                              "scheduler/scheduler_config.json")):
    folder = tmp_path / "export"
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}" if name.endswith(".json") else "weights")
    return folder


def table_after(text: str, heading: str) -> list[list[str]]:
    """The first Markdown table after `heading`: its rows (header row first), cells stripped."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_card_from_a_run_folder(run_dir, tmp_path):
    folder = exported(tmp_path)
    index = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    path = write_model_card(folder, run_dir / "ldm.ckpt")  # run_dir: the checkpoint's folder (it has report.json)
    assert path == folder / "README.md"
    text = path.read_text()

    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "other" and card.data.license_name == LICENSE_NAME
    assert {"lit-diffusion", "text-to-image", "latent-diffusion", "unet", "rectified-flow"} <= set(card.data.tags)
    assert re.search(r"^# license: .*repositories-licenses", text, re.M)  # the owner is told to choose one

    # the model, from the checkpoint's hyper-parameters
    model = dict((row[0], row[1]) for row in table_after(text, "## Model")[1:])
    assert model["denoiser"].startswith("U-Net, 1.78k parameters: model_channels 48")
    assert "rectified flow" in model["objective"] and "logit_normal" in model["objective"]
    assert model["image size"] == "32 x 32 px, latents 4 x 8 x 8"
    assert "vocabulary 263" in model["text encoder"] and "pooled embedding" in model["text encoder"]
    assert "latent scale 0.598" in model["autoencoder"]
    assert model["sampling defaults"] == "heun, 13 steps, guidance 3.0"
    assert model["training"].startswith("2500 optimizer steps (9 epochs), AdamW lr 0.001")
    assert "batch 64 per device" in model["training"]
    assert model["weights"].startswith("the EMA average (decay 0.995)")

    # the data: report.json's shards and the manifest's sample counts
    assert "/data/shapes/train-*.tar" in text
    shards = table_after(text, "## Training data")
    assert shards[1:] == [["train", "`train/000000.tar`", "3", "`/data/shapes/train-000000.tar`"],
                          ["train", "`train/000001.tar`", "2", "`/data/shapes/train-000001.tar`"],
                          ["val", "`val/000000.tar`", "2", "`/data/shapes/val-000000.tar`"]]
    assert "Samples per split: train 5, val 2." in text

    # the stages: figures, the fingerprint's config, the given checkpoint said as such
    stages = {row[0]: row for row in table_after(text, "## Training stages")[1:]}
    assert stages["ldm"][1] == "29.2 min" and "val/loss = 0.1024" in stages["ldm"][2]
    assert stages["vae"][1].startswith("given checkpoint")
    assert "ldm (from <code>ldm.fingerprint.json</code>)" in text and "config_file: configs/ldm/x.yaml" in text
    assert "clip (from report.json)" in text
    assert "vae was given as a finished checkpoint (`/elsewhere/vae.ckpt`)" in text

    # the evaluation table holds report.json's figures, per guidance
    rows = table_after(text, "## Evaluation")
    assert rows[0] == ["guidance", "FID (clip)", "CLIP score", "caption accuracy"]
    assert [row[0] for row in rows[1:]] == ["1", "3", "5"]
    for g, row in zip(GUIDANCE, rows[1:]):
        for cell, key in zip(row[1:], ("fid_clip", "clip_score", "caption_acc")):
            value = RESULTS[f"eval/{key}_g{g}"]
            assert cell == f"{value:.4g}"
            assert float(cell) == pytest.approx(value, rel=1e-3)
    detail = table_after(text, "Caption accuracy by caption kind")
    assert detail[0][1:3] == ["one object", "two objects"]
    assert detail[2][1] == f"{RESULTS['eval_detail/caption_one_object_g3.0']:.4g}"
    assert "**Note:**" not in text  # the report's ldm.ckpt is this one

    # the samples: copied and linked
    assert (folder / "samples.png").read_bytes() == (run_dir / "samples.png").read_bytes()
    assert "![samples](samples.png)" in text
    assert "negative prompt 'a purple square'" in text

    # how to load it
    assert 'model_id = "./export"' in text
    assert "DiffusionPipeline.from_pretrained(model_id, trust_remote_code=True)" in text
    for arg in ("prompt='a large red circle'", "negative_prompt='a purple square'", "guidance_scale=3.0",
                "num_inference_steps=13", "generator=torch.Generator().manual_seed(0)"):
        assert arg in text
    assert "`FlowMatchEulerDiscreteScheduler`; the checkpoint's default sampler" in text  # heun has no twin there
    assert "lit-diffusion sample --ckpt ldm.ckpt --prompt 'a large red circle' --guidance 3.0 --steps 13" in text
    assert "`unet/diffusion_pytorch_model.safetensors`" in text and "Not available" not in text


def test_card_says_when_the_scheduler_is_the_default_samplers_twin(run_dir, tmp_path):
    folder = exported(tmp_path)  # the checkpoint samples with heun, which export ships as its own scheduler
    (folder / "model_index.json").write_text(json.dumps({"scheduler": ["scheduler", "LitDiffusionFlowHeunScheduler"]}))
    text = write_model_card(folder, run_dir / "ldm.ckpt").read_text()
    assert "Its scheduler, `LitDiffusionFlowHeunScheduler`, steps as the checkpoint's default sampler `heun`" in text
    assert "does not reproduce" not in text


@pytest.mark.parametrize("change, extra, wanted, unwanted", [
    ({"frames": 8}, (), ["num_frames=8,", "clip = out.frames[0]", 'clip[0].save("sample.gif"'], ["out.images[0]"]),
    ({"condition": "text+image_embedding"}, ("image_encoder/config.json",),
     ['image=Image.open("photo.png")', "prompt='a large red circle'", 'out.images[0].save("sample.png")'],
     ["image_embeds="]),
    ({"condition": "image_embedding"}, (), ["image_embeds=embeddings"], ["prompt="]),
    ({"condition": "text+image_embedding"}, ("prior/config.json",), ["prompt='a large red circle'"],
     ["image=", "image_embeds="]),
])
def test_the_loading_example_fits_video_and_decoder_checkpoints(run_dir, tmp_path, change, extra, wanted, unwanted):
    ckpt = torch.load(run_dir / "ldm.ckpt", weights_only=True)
    ckpt["hyper_parameters"].update(change)
    torch.save(ckpt, run_dir / "ldm.ckpt")
    folder = exported(tmp_path, ("model_index.json", "unet/config.json", *extra))
    text = write_model_card(folder, run_dir / "ldm.ckpt").read_text()
    example = text[text.index("```python"):]
    example = example[:example.index("```", 3)]
    for piece in wanted:
        assert piece in example, (piece, example)
    for piece in unwanted:
        assert piece not in example, (piece, example)


def test_card_with_an_explicit_run_folder_notes_another_checkpoint(run_dir, tmp_path):
    other = tiny_ldm_checkpoint(tmp_path / "last.ckpt", run_dir)
    text = write_model_card(exported(tmp_path), other, run_dir=run_dir).read_text()
    assert f"these figures are report.json's, measured on `{run_dir / 'ldm.ckpt'}`" in text
    assert table_after(text, "## Evaluation")[1][3] == f"{RESULTS['eval/caption_acc_g1.0']:.4g}"


def test_card_without_a_report_says_what_is_missing(tmp_path):
    ckpt = tiny_ldm_checkpoint(tmp_path / "ldm.ckpt", tmp_path)
    folder = exported(tmp_path)
    text = write_model_card(folder, ckpt).read_text()
    assert ModelCard.load(folder / "README.md").data.library_name == "diffusers"
    assert "> **Sections not available:** training data, training stages, evaluation and samples" in text
    assert f"the checkpoint's folder `{tmp_path}` holds no report.json" in text
    for heading in ("## Training data", "## Training stages", "## Evaluation", "## Samples"):
        section = text[text.index(heading):].split("\n## ", 1)[0]
        assert "*Not available:* no pipeline report for this checkpoint" in section, heading
        assert "|" not in section  # no table, no figure
    assert not (folder / "samples.png").exists()
    assert "U-Net, 1.78k parameters" in text  # the checkpoint's own part is still there

    given = write_model_card(folder, ckpt, run_dir=tmp_path / "nowhere").read_text()
    assert f"the run folder given, `{tmp_path / 'nowhere'}`, holds no report.json" in given


@pytest.mark.parametrize("files, library, tag", [
    (("config.json", "model.safetensors", "tokenizer.json"), "transformers", "zero-shot-image-classification"),
    (("open_clip_config.json", "open_clip_model.safetensors"), "open_clip", "zero-shot-image-classification"),
])
def test_front_matter_follows_the_folder(run_dir, tmp_path, files, library, tag):
    card = ModelCard.load(write_model_card(exported(tmp_path, files), run_dir / "ldm.ckpt"))
    assert (card.data.library_name, card.data.pipeline_tag) == (library, tag)


def test_a_diffusers_component_has_no_pipeline_tag(run_dir, tmp_path):
    folder = exported(tmp_path, ("diffusion_pytorch_model.safetensors",))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    card = ModelCard.load(write_model_card(folder, run_dir / "ldm.ckpt"))
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", None)
    assert "AutoencoderKL.from_pretrained(model_id)" in card.text


class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        ops = list(operations)
        contents = {op.path_in_repo: op.path_or_fileobj for op in ops}
        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in ops], contents, kwargs))


def test_push_to_hub_uploads_the_card_last(run_dir, tmp_path):
    folder = exported(tmp_path)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("not uploaded")
    write_model_card(folder, run_dir / "ldm.ckpt")
    local_card = (folder / "README.md").read_text()
    api = FakeApi()
    uploaded = push_to_hub(folder, "someone/tiny-ldm", api=api, token="hf_x", private=True)

    weights = ["model_index.json", "samples.png", "scheduler/scheduler_config.json", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors"]
    assert uploaded == [*weights, "README.md"]
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit", "create_commit"]
    (_, repo, kwargs), first, second = api.calls
    assert repo == "someone/tiny-ldm"
    assert kwargs == {"token": "hf_x", "private": True, "repo_type": "model", "exist_ok": True}
    assert first[1] == second[1] == "someone/tiny-ldm"
    assert first[2] == weights and second[2] == ["README.md"]  # the card alone, after the weights
    weights_file = "unet/diffusion_pytorch_model.safetensors"
    assert first[3][weights_file] == str(folder / weights_file)
    assert first[4]["token"] == "hf_x" and first[4]["repo_type"] == "model"
    card = second[3]["README.md"].decode()
    assert 'model_id = "someone/tiny-ldm"' in card and "./export" not in card
    assert card.replace('"someone/tiny-ldm"', '"./export"  # the exported folder; on the Hub: its repo id') \
        == local_card
    assert (folder / "README.md").read_text() == local_card  # the folder's own card is left as it was


def test_push_to_hub_without_a_card_uploads_the_rest(tmp_path):
    api = FakeApi()
    assert push_to_hub(exported(tmp_path, ("config.json", "model.safetensors")), "a/b", api=api) \
        == ["config.json", "model.safetensors"]
    assert api.calls[0][2]["private"] is False and len(api.calls) == 2


@pytest.mark.parametrize("make", ["empty", "missing", "weights_only"])
def test_a_folder_that_is_no_export_is_refused(run_dir, tmp_path, make):
    folder = tmp_path / "not_an_export"
    if make != "missing":
        folder.mkdir()
    if make == "weights_only":
        (folder / "model.safetensors").write_text("weights")
    api = FakeApi()
    with pytest.raises(ExportError, match=re.escape(str(folder))):
        push_to_hub(folder, "a/b", api=api)
    assert api.calls == []
    with pytest.raises(ExportError, match=re.escape(str(folder))):
        write_model_card(folder, run_dir / "ldm.ckpt")
