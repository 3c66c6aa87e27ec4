"""Exporting stage checkpoints to published formats (lit_diffusion.export): each export is loaded by the library that
defines the format (diffusers, transformers, open_clip) and compared with our own outputs, then imported back with
our importers (lit_diffusion.pretrained), which must give the same weights bit for bit. Tiny models, no network."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP

EXTRA = 'the pretrained extra is not installed: pip install -e ".[pretrained]"'
diffusers = pytest.importorskip("diffusers", reason=EXTRA)
open_clip = pytest.importorskip("open_clip", reason=EXTRA)
transformers = pytest.importorskip("transformers", reason=EXTRA)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=EXTRA)

from lit_diffusion.cli import main as cli_main  # noqa: E402
from lit_diffusion.export import ExportError  # noqa: E402
from lit_diffusion.export.clip import export_open_clip, export_transformers  # noqa: E402
from lit_diffusion.export.vae import export_vae  # noqa: E402
from lit_diffusion.pretrained.clip import convert_open_clip, load_pretrained_clip  # noqa: E402
from lit_diffusion.pretrained.vae import load_pretrained_vae  # noqa: E402
from lit_diffusion.pretrained.weights import read_state_dict  # noqa: E402
from lit_diffusion.stages.clip import CLIPModule  # noqa: E402
from lit_diffusion.stages.vae import VAEModule  # noqa: E402

CAPTIONS = ["a large red circle above a small blue square", "two small green triangles left of a yellow star",
            "Hello,   World!! 42 cats don't stop; naïve café", "", "word " * 100]  # odd text, empty, cut to fit
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_ckpts, tmp_path_factory):
    """The tiny trained clip.ckpt / vae.ckpt, exported with `lit-diffusion export` to each format."""
    root = tmp_path_factory.mktemp("exported")
    for ckpt, to in (("vae", "diffusers"), ("clip", "transformers"), ("clip", "open_clip")):
        cli_main(["export", "--ckpt", str(tiny_ckpts[ckpt]), "--to", to, "--out", str(root / to)])
    return {**{to: root / to for to in ("diffusers", "transformers", "open_clip")}, **tiny_ckpts, "root": root}


def assert_same_weights(ours: dict, back: dict, prefix: str = "") -> None:
    ours = {k: v for k, v in ours.items() if k.startswith(prefix)}
    back = {k: v for k, v in back.items() if k.startswith(prefix)}
    assert ours.keys() == back.keys()
    different = [k for k in ours if ours[k].dtype != back[k].dtype or not torch.equal(ours[k], back[k])]
    assert not different, f"not bit for bit: {different[:5]}"


# ------------------------------------------------------------------------------------------------------- VAE
def assert_diffusers_vae_matches(ours: VAEModule, folder) -> None:
    ref, info = diffusers.AutoencoderKL.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # every weight filled, none left over
    ref.eval()
    config = json.loads((folder / "config.json").read_text())
    scale, shift = config["scaling_factor"], config["shift_factor"]
    assert (scale, shift) == (float(ours.scale_factor), float(ours.latent_mean))
    torch.manual_seed(1)
    images = torch.rand(2, ours.config.in_channels, 16, 16) * 2 - 1
    with torch.no_grad():
        theirs, mine = ref.encode(images).latent_dist, ours.vae.encode(images)
        torch.testing.assert_close(mine.mean, theirs.mean, **TOL)
        torch.testing.assert_close(mine.std, theirs.std, **TOL)
        torch.testing.assert_close(ours.encode(images), (theirs.mean - shift) * scale, **TOL)
        z = torch.randn_like(theirs.mean)
        torch.testing.assert_close(ours.vae.decode(z), ref.decode(z).sample, **TOL)
        torch.testing.assert_close(ours.decode((z - shift) * scale), ref.decode(z).sample.clamp(-1, 1), **TOL)


def assert_imports_back(ours: VAEModule, back: VAEModule) -> None:
    assert_same_weights(ours.vae.state_dict(), back.vae.state_dict())
    assert torch.equal(back.scale_factor, ours.scale_factor) and torch.equal(back.latent_mean, ours.latent_mean)


def test_vae_checkpoint_exports_to_diffusers_with_our_outputs(exported):
    ours = VAEModule.from_checkpoint(exported["vae"])
    assert not ours.config.mid_attention and ours.config.norm_groups == 4  # TINY_VAE: what SD's VAE is not
    assert sorted(p.name for p in exported["diffusers"].iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]
    assert_diffusers_vae_matches(ours, exported["diffusers"])


def test_vae_export_imports_back_bit_for_bit(exported):
    ours = VAEModule.from_checkpoint(exported["vae"])
    back = load_pretrained_vae(exported["diffusers"])
    assert back.config == ours.config
    assert_imports_back(ours, back)
    # and through `lit-diffusion import vae`, as a stage checkpoint
    cli_main(["import", "vae", str(exported["diffusers"]), "--out", str(exported["root"] / "reimported_vae.ckpt")])
    assert_imports_back(ours, VAEModule.from_checkpoint(exported["root"] / "reimported_vae.ckpt"))


@pytest.mark.parametrize("arch", [
    dict(base_channels=8, ch_mult=[1, 2], num_res_blocks=2, mid_attention=True, quant_conv=True, norm_groups=8),
    dict(in_channels=1, base_channels=4, ch_mult=[2, 4, 4], num_res_blocks=1, z_channels=3, norm_groups=4),
    dict(base_channels=8, ch_mult=[1], num_res_blocks=1, z_channels=2, mid_attention=False, norm_groups=2),
], ids=["attention-quant-conv", "one-channel-first-mult-2", "one-level"])
def test_each_vae_config_exports_exactly(tmp_path, arch):
    torch.manual_seed(0)
    ours = VAEModule(arch=arch).eval()
    with torch.no_grad():
        for p in ours.parameters():  # away from the zero / unit initialisation of norms and biases
            p.add_(0.05 * torch.randn_like(p))
    ours.scale_factor.fill_(0.3611)
    ours.latent_mean.fill_(0.1159)
    export_vae(ours, tmp_path / "vae")
    assert_diffusers_vae_matches(ours, tmp_path / "vae")
    back = load_pretrained_vae(tmp_path / "vae")
    assert_imports_back(ours, back)
    # the importer reads the first level's width as the base: the same network, maybe another way of writing it
    widths = [back.config.base_channels * m for m in back.config.ch_mult]
    assert widths == [ours.config.base_channels * m for m in ours.config.ch_mult]


def test_vae_exports_refuse_what_diffusers_cannot_hold(exported, tmp_path, caplog, capsys):
    with pytest.raises(ExportError, match=r"VAEConfig\.logvar_min/logvar_max = \(-20\.0, 20\.0\): diffusers' "
                                          r"AutoencoderKL clamps the posterior log-variance at \(-30\.0, 20\.0\)"):
        export_vae(VAEModule(arch=dict(base_channels=8, ch_mult=[1], norm_groups=4, logvar_min=-20.0)), tmp_path)
    with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
        export_vae(VAEModule(arch=dict(base_channels=8, ch_mult=[1], norm_groups=4, dropout=0.1)), tmp_path / "d")
    assert "VAEConfig.dropout = 0.1: diffusers' AutoencoderKL has no dropout" in caplog.text
    with pytest.raises(SystemExit):
        cli_main(["export", "--ckpt", str(exported["clip"]), "--to", "diffusers", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "lit-diffusion export: error: " in err and "clip.ckpt is a 'clip' checkpoint, expected a 'vae' " \
        "checkpoint (a diffusers AutoencoderKL is exported from a VAE stage checkpoint, vae.ckpt)" in err


# ------------------------------------------------------------------------------------------------------ CLIP
def pooled(output):
    return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 returns an output object


def pixels(images01, mean, std):
    return (images01 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_clip_checkpoint_exports_to_transformers_with_our_outputs(exported):
    ours = CLIPModule.from_checkpoint(exported["clip"])
    folder = exported["transformers"]
    ref, info = transformers.CLIPModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    ref.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ours.tokenize(CAPTIONS))  # our ids, context length and padding
    pre = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    assert list(pre.image_mean) == [0.5] * 3 and list(pre.image_std) == [0.5] * 3  # [-1, 1], as ours reads
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        hidden = ref.text_model(input_ids=ids).last_hidden_state
        text_ref = F.normalize(pooled(ref.get_text_features(input_ids=ids)), dim=-1)
        image_ref = F.normalize(pooled(ref.get_image_features(pixel_values=pixels(images, pre.image_mean,
                                                                                   pre.image_std))), dim=-1)
        token_features, text_ours = ours.encode_text(ids)
        image_ours = ours.encode_image(images * 2 - 1)
    torch.testing.assert_close(token_features, hidden, **TOL)
    torch.testing.assert_close(text_ours, text_ref, **TOL)
    torch.testing.assert_close(image_ours, image_ref, **TOL)
    assert float(ref.logit_scale.detach().exp()) == pytest.approx(float(ours.model.scale().detach()), rel=1e-6)


def test_transformers_export_imports_back_bit_for_bit(exported):
    ours = CLIPModule.from_checkpoint(exported["clip"])
    back = load_pretrained_clip(exported["transformers"])
    assert_same_weights(ours.state_dict(), back.state_dict(), prefix="model.")
    assert torch.equal(back.tokenize(CAPTIONS), ours.tokenize(CAPTIONS))
    assert back.hparams.text == ours.hparams.text and back.hparams.embed_dim == ours.hparams.embed_dim
    # a folder says its pixel statistics; ours ([-1, 1] in) come back as the equivalent mean = std = 0.5
    assert back.hparams.vision == {**ours.hparams.vision, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    cli_main(["import", "clip", str(exported["transformers"]), "--out", str(exported["root"] / "reimported.ckpt")])
    assert_same_weights(ours.state_dict(), CLIPModule.from_checkpoint(exported["root"] / "reimported.ckpt")
                        .state_dict(), prefix="model.")


def assert_open_clip_matches(ours: CLIPModule, model, tokenizer) -> None:
    model.eval()
    ids = tokenizer(CAPTIONS)
    assert torch.equal(ids, ours.tokenize(CAPTIONS))
    size = ours.image_size
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    torch.manual_seed(1)
    images = torch.rand(3, 3, size, size)
    features = []
    hook = model.ln_final.register_forward_hook(lambda module, args, out: features.append(out))
    with torch.no_grad():
        text_ref = model.encode_text(ids, normalize=True)
        image_ref = model.encode_image(pixels(images, mean, std), normalize=True)
        token_features, text_ours = ours.encode_text(ids)
        image_ours = ours.encode_image(images * 2 - 1)
    hook.remove()
    torch.testing.assert_close(token_features, features[0], **TOL)
    torch.testing.assert_close(text_ours, text_ref, **TOL)
    torch.testing.assert_close(image_ours, image_ref, **TOL)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(float(ours.model.scale().detach()), rel=1e-6)


def test_clip_checkpoint_exports_to_open_clip_with_our_outputs(exported):
    ours = CLIPModule.from_checkpoint(exported["clip"])
    folder = exported["open_clip"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert model.visual.preprocess_cfg["mean"] == [0.5] * 3
    assert_open_clip_matches(ours, model, open_clip.get_tokenizer(f"local-dir:{folder}"))
    # open_clip's documented way for a custom model: its config registered by name, the weights as `pretrained`,
    # the pixel statistics given (a model config holds none)
    name = folder.name
    open_clip.add_model_config(folder / f"{name}.json")
    by_name, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(folder / "open_clip_model.safetensors"),
                                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert_open_clip_matches(ours, by_name, open_clip.get_tokenizer(name))


def test_open_clip_export_imports_back_bit_for_bit(exported):
    """The open_clip importer's conversion (the tokenizer is ours, which an open_clip file does not carry)."""
    ours = CLIPModule.from_checkpoint(exported["clip"])
    model_cfg = json.loads((exported["open_clip"] / "open_clip_config.json").read_text())["model_cfg"]
    vision = model_cfg["vision_cfg"]
    cfg, state = convert_open_clip(read_state_dict(exported["open_clip"] / "open_clip_model.safetensors"), "export",
                                   model_cfg["quick_gelu"], model_cfg["text_cfg"]["heads"],
                                   vision["width"] // vision["head_width"])
    assert_same_weights({k: v for k, v in ours.state_dict().items() if k.startswith("model.")}, state)
    assert cfg["embed_dim"] == ours.hparams.embed_dim
    assert {k: cfg["text"][k] for k in ("width", "layers", "heads", "mlp_ratio", "quick_gelu", "context_length",
                                        "vocab_size")} == {k: ours.hparams.text[k] for k in ("width", "layers", "heads",
                                                           "mlp_ratio", "quick_gelu", "context_length", "vocab_size")}
    assert {k: cfg["vision"][k] for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio",
                                          "pool", "quick_gelu")} == {k: ours.hparams.vision[k] for k in (
        "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "pool", "quick_gelu")}


def test_open_clip_export_imports_back_with_our_tokenizer(exported):
    """`import clip` of the exported open_clip file: our weights bit for bit, and our token ids (from the folder's
    tokenizer files, not OpenAI's vocabulary)."""
    ours = CLIPModule.from_checkpoint(exported["clip"])
    back = load_pretrained_clip(exported["open_clip"] / "open_clip_model.safetensors")
    assert_same_weights(ours.state_dict(), back.state_dict())
    captions = ["a large red circle", "a small blue square left of a green triangle", "an unseen word: zebra!"]
    assert torch.equal(back.tokenizer(captions), ours.tokenizer(captions))
    assert back.tokenizer.pad_id == ours.tokenizer.pad_id
    # and it computes what ours does: the pixel statistics come from the export's preprocess_cfg (OpenAI's had
    # been assumed, and the same weights embedded images otherwise)
    torch.manual_seed(0)
    images = torch.rand(2, 3, ours.hparams.vision["image_size"], ours.hparams.vision["image_size"]) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images), ours.encode_image(images), rtol=1e-5, atol=1e-6)


def test_clip_with_openai_tokenizer_goes_to_open_clip_and_back_but_not_to_transformers(tmp_path):
    """A CLIP imported from open_clip keeps OpenAI's tokenizer, which pads with "!" (id 0): open_clip's own
    tokenizer gives its ids; a transformers tokenizer cannot pad with an ordinary token."""
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(embed_dim=16, quick_gelu=True,
                               vision_cfg=dict(image_size=16, patch_size=8, width=64, layers=1, head_width=32),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    path = tmp_path / "openai.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_pretrained_clip(path, quick_gelu=True, text_heads=2, vision_heads=2)
    export_open_clip(ours, tmp_path / "oc")
    assert not (tmp_path / "oc" / "tokenizer.json").exists()  # open_clip's SimpleTokenizer, not an HF one
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert_open_clip_matches(ours, model, tokenizer)
    back = load_pretrained_clip(tmp_path / "oc" / "open_clip_model.safetensors")  # activation, heads: its config
    assert_same_weights(ours.state_dict(), back.state_dict(), prefix="model.")
    assert back.hparams.text == ours.hparams.text and back.hparams.vision == ours.hparams.vision
    with pytest.raises(ExportError, match=r"the tokenizer pads with id 0 \('!'\), an ordinary vocabulary entry: "
                                          r"a transformers tokenizer .* pads only with a special token"):
        export_transformers(ours, tmp_path / "hf")


@pytest.mark.parametrize("change, targets, message", [
    (dict(text_only=True), ("transformers", "open_clip"),
     r"text_only = True: a text encoder without its image tower; .* holds both towers"),
    (dict(vision=dict(frames=2)), ("transformers", "open_clip"),
     r"vision\.frames = 2: a video CLIP .* embeds single images only"),
    (dict(vision=dict(pool="mean")), ("transformers", "open_clip"),
     r"vision\.pool = 'mean': .* always has a class token and pools it"),
    (dict(vision=dict(quick_gelu=True)), ("open_clip",),
     r"vision\.quick_gelu = True but text\.quick_gelu = False: open_clip's CLIP has one quick_gelu setting"),
], ids=["text-only", "video", "mean-pool", "quick-gelu-per-tower"])
def test_clip_exports_refuse_what_the_target_cannot_hold(shapes_data, tmp_path, change, targets, message):
    args = {**TINY_CLIP, "vision": {**TINY_CLIP["vision"], **change.get("vision", {})},
            "text_only": change.get("text_only", False)}
    module = CLIPModule(tokenizer_path=str(shapes_data / "tokenizer.json"), **args)
    exports = {"transformers": export_transformers, "open_clip": export_open_clip}
    for target in targets:
        with pytest.raises(ExportError, match=message):
            exports[target](module, tmp_path / target)
        assert not (tmp_path / target).exists()  # refused before writing anything
    if targets == ("open_clip",):  # transformers has an activation per tower
        export_transformers(module, tmp_path / "transformers")
        assert transformers.CLIPConfig.from_pretrained(str(tmp_path / "transformers")).vision_config.hidden_act \
            == "quick_gelu"


def test_transformers_export_refuses_an_end_of_text_id_of_2(tmp_path):
    """transformers reads eos_token_id 2 as a pre-2023 CLIP config and pools at the highest id instead."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from lit_diffusion.data.tokenizer import EOT, PAD, SOT, UNK, Tokenizer

    backend = HFTokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CAPTIONS, trainers.BpeTrainer(special_tokens=[SOT, PAD, EOT, UNK], show_progress=False))
    tokenizer = Tokenizer(backend, context_length=8)
    assert tokenizer.eot_id == 2
    module = CLIPModule(tokenizer_json=tokenizer.to_json(), **TINY_CLIP)
    with pytest.raises(ExportError, match=r"text\.eot_id = 2 .* pools at the highest token id"):
        export_transformers(module, tmp_path / "hf")
    export_open_clip(module, tmp_path / "oc")  # open_clip pools at the id it is given
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokens = module.tokenize(["a large red circle", "word " * 10])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), module.encode_text(tokens)[1], **TOL)


def test_an_export_never_writes_into_a_folder_that_holds_files(tmp_path):
    """The exporters' own folder check (the CLI calls it before loading): a folder holding another export's files, or
    a user's, is refused and left as it was."""
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(ExportError, match=rf"{tmp_path} already holds README.md: give an empty or new folder"):
        export_vae(VAEModule(arch=dict(base_channels=8, ch_mult=[1], norm_groups=4)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
