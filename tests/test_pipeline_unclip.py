"""The unCLIP pipeline's final evaluation and report (`stages.prior` in the config): the stack, the decoder fed the
true embeddings and the text-conditioned model side by side, diversity and variations, a grid of the stack; a
text model with another CLIP is refused. Tiny real checkpoints, a few steps each."""


import lightning as L
import pytest
import torch
from conftest import TINY_UNET

from lit_diffusion import pipeline
from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.evaluation.report import _unclip_lines
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.prior import DiffusionPriorModule


def _fit(module, latents, root, name):
    data = LatentDataModule(train_urls=str(latents / "train" / "*.tar"), val_urls=str(latents / "val" / "*.tar"),
                            batch_size=32, num_workers=0, train_batches_per_epoch=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root / name))
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / f"{name}.ckpt")


@pytest.fixture(scope="module")
def unclip_run(tiny_ckpts, tmp_path_factory):
    from lit_diffusion.cli import main

    root = tmp_path_factory.mktemp("unclip_run")
    data = tiny_ckpts["data"]
    latents = root / "latents"
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--train", str(data / "train-*.tar"), "--val", str(data / "val-*.tar"), "--out", str(latents),
          "--image-size", "16", "--batch-size", "64", "--device", "cpu", "--image-embeddings"])
    ck = dict(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]), image_size=16, unet=TINY_UNET,
              warmup_steps=0, sampler="ddim", sample_steps=2)
    torch.manual_seed(0)
    _fit(LatentDiffusionModule(**ck, condition="text+image_embedding", p_uncond=0.5), latents, root, "ldm")
    _fit(DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior=dict(width=32, depth=2, heads=2),
                              sample_steps=2), latents, root, "prior")
    _fit(LatentDiffusionModule(**ck), latents, root, "text")
    cfg = {"name": "u", "root": str(root), "stages": {"clip": {}, "vae": {}, "prior": {}, "ldm": {}},
           "evaluation": {"guidance": [1, 3], "num_samples": 8, "batch_size": 8, "features": ["clip"],
                          "sampler": "ddim", "steps": 2, "compare": str(root / "text.ckpt"),
                          "diversity": {"captions": 3, "per_caption": 2}, "variations": {"images": 3, "per_image": 2}},
           "samples": {"prompts": ["a red circle", "a blue square"], "guidance": [1, 3], "steps": 2}}
    return cfg, root, {"val_urls": str(data / "val-*.tar")}


def test_the_report_sets_the_stack_beside_the_decoder_and_the_text_model(unclip_run):
    cfg, root, data = unclip_run
    evaluation = pipeline.evaluate_final(cfg, root, data)
    unclip = evaluation["unclip"]
    assert set(unclip["systems"]) == {"unclip", "decoder_true_embedding", "text"}
    assert unclip["systems"]["unclip"] is evaluation["results"]
    assert evaluation["results"]["eval_detail/image_embeddings_from_prior"] == 1.0
    assert unclip["systems"]["decoder_true_embedding"]["eval_detail/image_embeddings_from_prior"] == 0.0
    assert "eval_detail/image_embeddings_from_prior" not in unclip["systems"]["text"]
    # the three differ: three models (or two ways of feeding one)
    fids = {k: v["eval/fid_clip_g3.0"] for k, v in unclip["systems"].items()}
    assert len(set(fids.values())) == 3, fids
    assert unclip["diversity"]["unclip"]["captions"] == 3 and unclip["diversity"]["text"]["captions"] == 3
    # positions of the same samples, and the data's own spread of the same captions as the reference
    positions = unclip["diversity"]["unclip"]["positions"]
    assert positions["captions"] == 3 and positions["data"]["found"] == 1.0 and unclip["note"] is None
    assert unclip["variations"]["sources"] == 3 and unclip["variations"]["variations"] == 6
    lines = "\n".join(_unclip_lines(unclip, [1.0, 3.0], ["clip"]))
    for key, label in (("text", "text-conditioned"), ("unclip", "caption -> prior -> decoder"),
                       ("decoder_true_embedding", "true image embedding")):
        acc = unclip["systems"][key]["eval/caption_acc_g3.0"]
        assert any(label in line and f"| 3 | {acc:.4g}" in line for line in lines.splitlines()), (label, lines)
    assert f"{unclip['variations']['similarity']:.4g}" in lines


def test_the_grid_is_the_stacks(unclip_run, monkeypatch):
    cfg, root, _ = unclip_run
    seen = []
    from lit_diffusion.unclip import UnCLIP

    real = UnCLIP.generate
    monkeypatch.setattr(UnCLIP, "generate", lambda self, *a, **k: seen.append(a[0]) or real(self, *a, **k))
    out = pipeline.sample_grid(cfg, root)
    assert seen and all(len(p) == 1 for p in seen) and {p[0] for p in seen} == {"a red circle", "a blue square"}
    assert (root / "samples.png").is_file() and out == str(root / "samples.png")


def test_a_text_model_of_another_clip_is_left_out_and_said_why(unclip_run, tiny_ckpts, tmp_path):
    cfg, root, data = unclip_run
    other = torch.load(root / "text.ckpt", weights_only=True)
    key = next(k for k in other["state_dict"] if k.startswith("clip."))
    other["state_dict"][key] = other["state_dict"][key] + 1
    torch.save(other, tmp_path / "other.ckpt")
    cfg = {**cfg, "evaluation": {**cfg["evaluation"], "compare": str(tmp_path / "other.ckpt")}}
    out = pipeline.evaluate_unclip(cfg, root, data, {})  # refused and said why; the stack's figures are kept
    assert out["compare"] is None and "text" not in out["systems"] and "text" not in out["diversity"]
    assert "other.ckpt was trained with another CLIP or VAE" in out["note"]
    assert f"No text-conditioned model to compare with: {out['note']}." in _unclip_lines(out, [3.0], ["clip"])
