"""Importing published weights (lit_diffusion.pretrained): each import is checked against the library that defines
the format (diffusers, open_clip, transformers), on small models with random weights saved in tmp_path."""

import json
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, _fit, randomise_unet, tiny_datamodule

EXTRA = 'the pretrained extra is not installed: pip install -e ".[pretrained]"'
diffusers = pytest.importorskip("diffusers", reason=EXTRA)
open_clip = pytest.importorskip("open_clip", reason=EXTRA)
transformers = pytest.importorskip("transformers", reason=EXTRA)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=EXTRA)

from lit_diffusion.cli import main as cli_main  # noqa: E402
from lit_diffusion.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from lit_diffusion.pretrained.clip import _open_clip_vocab, load_pretrained_clip  # noqa: E402
from lit_diffusion.pretrained.vae import load_pretrained_vae, measure_latent_scale  # noqa: E402
from lit_diffusion.pretrained.weights import PretrainedError  # noqa: E402
from lit_diffusion.stages.clip import CLIPModule  # noqa: E402
from lit_diffusion.stages.base import CheckpointError  # noqa: E402
from lit_diffusion.stages.vae import VAEModule  # noqa: E402

CAPTIONS = ["a large red circle above a small blue square", "Hello,   World!! 42 cats don't stop; naïve café",
            "", "word " * 100]  # punctuation, digits, accents, empty, longer than the context (truncated)
TOL = dict(atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- VAE
def tiny_diffusers_vae(**config):
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=2,
                  latent_channels=4, norm_num_groups=4, sample_size=16)
    return diffusers.AutoencoderKL(**{**kwargs, **config}).eval()


def to_ldm_names(state: dict) -> dict:
    """diffusers -> original LDM key names (checked below against diffusers' own LDM converter)."""
    n = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("encoder.down_blocks."):
            i, rest = parts[2], ".".join(parts[3:])
            key = (f"encoder.down.{i}.downsample.{rest[len('downsamplers.0.'):]}" if rest.startswith("downsamplers")
                   else f"encoder.down.{i}.block.{rest[len('resnets.'):]}")
        elif key.startswith("decoder.up_blocks."):
            i, rest = n - 1 - int(parts[2]), ".".join(parts[3:])
            key = (f"decoder.up.{i}.upsample.{rest[len('upsamplers.0.'):]}" if rest.startswith("upsamplers")
                   else f"decoder.up.{i}.block.{rest[len('resnets.'):]}")
        key = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        for theirs, ldm in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                            ("to_out.0", "proj_out")):
            key = key.replace(f"mid_block.attentions.0.{theirs}.", f"mid.attn_1.{ldm}.")
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[key] = value
    return out


def assert_vae_matches(ours: VAEModule, ref, scale: float, shift: float = 0.0):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        torch.testing.assert_close(ours.encode(images), (posterior.mean - shift) * scale, **TOL)
        torch.testing.assert_close(ours.vae.encode(images).logvar, posterior.logvar, **TOL)
        reconstruction = ref.decode(posterior.mean).sample
        torch.testing.assert_close(ours.vae.decode(posterior.mean), reconstruction, **TOL)
        torch.testing.assert_close(ours.decode((posterior.mean - shift) * scale), reconstruction.clamp(-1, 1), **TOL)


def test_default_vae_has_no_bottleneck_convs_and_encodes_as_before():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)).eval()
    assert all(k.startswith(("encoder.", "decoder.")) for k in vae.state_dict())  # keys of existing checkpoints
    x, z = torch.rand(1, 3, 8, 8), torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(vae.encode(x).mean, vae.encoder(x).chunk(2, dim=1)[0], rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(z), vae.decoder(z), rtol=0, atol=0)


def test_vae_from_diffusers_folder_equals_diffusers(tmp_path):
    ref = tiny_diffusers_vae(scaling_factor=0.3611, shift_factor=0.1159)  # SD3's published pair
    ref.save_pretrained(tmp_path / "vae")
    ours = load_pretrained_vae(tmp_path / "vae")
    assert ours.config.quant_conv and ours.config.ch_mult == [1, 2, 2] and ours.config.num_res_blocks == 2
    assert float(ours.scale_factor) == pytest.approx(0.3611) and float(ours.latent_mean) == pytest.approx(0.1159)
    assert_vae_matches(ours, ref, 0.3611, 0.1159)
    # a pipeline folder (vae/ inside) and an override of the published scale
    assert float(load_pretrained_vae(tmp_path, scale_factor=0.5).scale_factor) == 0.5


def test_vae_without_quant_convs_or_mid_attention(tmp_path):
    ref = tiny_diffusers_vae(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_pretrained_vae(tmp_path / "vae")
    assert not ours.config.quant_conv and not ours.config.mid_attention
    assert_vae_matches(ours, ref, 0.18215)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_vae_from_stable_diffusion_single_file_equals_diffusers(tmp_path, fmt):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = tiny_diffusers_vae()
    ldm = to_ldm_names(ref.state_dict())
    # the file is what diffusers itself reads as an LDM VAE: its converter gives back exactly the reference weights
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dict(ref.config))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in ref.state_dict().items())

    whole = {"first_stage_model." + k: v.contiguous() for k, v in ldm.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)  # the rest of SD is ignored
    whole["first_stage_model.loss.logvar"] = torch.zeros(())  # and so is the VAE's training loss
    if fmt == "safetensors":
        whole["conditioner.embedders.0.transformer.x"] = torch.zeros(1)  # SDXL's text encoders: SDXL's scale
        path = tmp_path / "sd_xl.safetensors"
        safetensors_torch.save_file(whole, str(path))
        scale = 0.13025
    else:
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": whole, "global_step": 0}, path)
        scale = 0.18215
    ours = load_pretrained_vae(path, norm_groups=4)  # a single file does not record it; SD's is the default 32
    assert float(ours.scale_factor) == pytest.approx(scale)
    assert_vae_matches(ours, ref, scale)


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_vae_files_are_refused_naming_file_and_key(tmp_path):
    ref = tiny_diffusers_vae()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _RunsCode()}, f, protocol=2)
    with pytest.raises(PretrainedError, match=r"refusing to load .*evil\.ckpt.*weights_only=True"):
        load_pretrained_vae(evil)

    missing = tmp_path / "missing.safetensors"
    safetensors_torch.save_file({k: v for k, v in state.items() if k != "decoder.conv_in.bias"}, str(missing))
    with pytest.raises(PretrainedError, match=r"missing\.safetensors: no weights for decoder\.conv_in\.bias"):
        load_pretrained_vae(missing, norm_groups=4)

    extra = tmp_path / "extra.safetensors"
    safetensors_torch.save_file({**state, "encoder.down_blocks.0.attentions.0.to_q.weight": torch.zeros(8, 8)},
                                str(extra))
    with pytest.raises(PretrainedError, match=r"extra\.safetensors: unexpected weight encoder\.down_blocks\.0\.attent"):
        load_pretrained_vae(extra, norm_groups=4)

    shape = tmp_path / "shape.safetensors"
    safetensors_torch.save_file({**state, "decoder.conv_out.bias": torch.zeros(3), "encoder.conv_out.bias":
                                 torch.zeros(5)}, str(shape))
    with pytest.raises(PretrainedError, match=r"shape\.safetensors: encoder\.conv_out\.bias has shape \(5,\)"):
        load_pretrained_vae(shape, norm_groups=4)

    other = tmp_path / "clip.safetensors"  # another architecture altogether
    safetensors_torch.save_file({"token_embedding.weight": torch.zeros(4, 2)}, str(other))
    with pytest.raises(PretrainedError, match=r"clip\.safetensors: not a VAE .* \(first key: token_embedding"):
        load_pretrained_vae(other, norm_groups=4)

    with pytest.raises(PretrainedError, match="weight file not found: .*nowhere.ckpt"):
        load_pretrained_vae(tmp_path / "nowhere.ckpt")


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    from lit_diffusion.pretrained.weights import read_state_dict

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[pretrained\]"'):
        read_state_dict(tmp_path / "w.safetensors")


def test_measured_latent_scale_is_one_over_the_std_of_posterior_means(tmp_path, shapes_data):
    tiny_diffusers_vae().save_pretrained(tmp_path / "vae")
    ours = load_pretrained_vae(tmp_path / "vae")
    mean, scale = measure_latent_scale(ours, str(shapes_data / "val-*.tar"), image_size=16, max_images=40,
                                       batch_size=16)
    data = tiny_datamodule(shapes_data, batch_size=40)
    data.setup("validate")
    images = next(iter(data.val_dataloader()))["image"]  # the same first 40 val images
    with torch.no_grad():
        z = ours.vae.encode(images).mean.double()
        scaled = ours.encode(images).double()
    assert mean == pytest.approx(float(z.mean()), rel=1e-6)
    assert scale == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)
    assert float(scaled.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


# ------------------------------------------------------------------------------------------------------ CLIP
def tiny_open_clip(quick_gelu=True, head_width=64):
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=16, quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=head_width),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)).eval()


def openai_pixels(images01):
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    return (images01 - mean) / std


def write_hf_tokenizer_files(folder):
    """vocab.json + merges.txt of OpenAI's BPE (from open_clip's wheel), as a Hugging Face CLIP folder has them."""
    vocab, merges = _open_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(dict(vocab)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_hf_clip(image_size=32):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def pooled(output):
    return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 returns an output object


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_from_open_clip_equals_open_clip(tmp_path, quick_gelu):
    ref = tiny_open_clip(quick_gelu)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_pretrained_clip(path, quick_gelu=quick_gelu, text_heads=2, vision_heads=2)

    ids = open_clip.tokenize(CAPTIONS)  # [4, 77], zero-padded, truncated with eot last
    assert torch.equal(ours.tokenize(CAPTIONS), ids)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    features = []
    hook = ref.ln_final.register_forward_hook(lambda module, args, out: features.append(out))
    with torch.no_grad():
        text_ref = ref.encode_text(ids, normalize=True)
        image_ref = ref.encode_image(openai_pixels(images), normalize=True)
        token_features, text_ours = ours.encode_text(ids)
        image_ours = ours.encode_image(images * 2 - 1)
    hook.remove()
    torch.testing.assert_close(token_features, features[0], **TOL)
    torch.testing.assert_close(text_ours, text_ref, **TOL)
    torch.testing.assert_close(image_ours, image_ref, **TOL)
    assert float(ours.model.scale().detach()) == pytest.approx(float(ref.logit_scale.exp()), rel=1e-6)


def test_openai_torchscript_file_is_read_without_pickle_and_uses_quick_gelu(tmp_path):
    """OpenAI's own files (ViT-B-32.pt, ...) are TorchScript archives carrying input_resolution beside the weights."""
    ref = tiny_open_clip(quick_gelu=True)
    ref.register_buffer("input_resolution", torch.tensor(32))
    torch.jit.script(ref).save(str(tmp_path / "ViT-tiny.pt"))
    ours = load_pretrained_clip(tmp_path / "ViT-tiny.pt", text_heads=2)  # activation not given: OpenAI's
    assert ours.hparams.text["quick_gelu"] and ours.hparams.vision["quick_gelu"]
    ids = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids)[1], ref.encode_text(ids, normalize=True), **TOL)


def test_open_clip_file_without_its_activation_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save(tiny_open_clip().state_dict(), path)
    with pytest.raises(PretrainedError, match=r"weights\.bin: the file does not record its activation.*--quick-gelu"):
        load_pretrained_clip(path)
    # open_clip's hub downloads carry their model config beside the weights
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": True, "text_cfg": {"heads": 2}, "vision_cfg": {"width": 128, "head_width": 64}}}))
    assert load_pretrained_clip(path).hparams.text["quick_gelu"]


def test_open_clip_file_without_its_image_heads_is_refused(tmp_path):
    """Image heads are in no weight's shape, and open_clip's ViT-H / -g / -bigG towers are not 64 wide: a bare file
    needs --vision-heads (or its open_clip_config.json); a wrong count had loaded and embedded images wrongly."""
    ref = tiny_open_clip(quick_gelu=False, head_width=32)
    path = tmp_path / "bare.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(PretrainedError, match=r"bare\.safetensors: the file does not record its image tower's "
                                              r"attention heads .*--vision-heads N"):
        load_pretrained_clip(path, quick_gelu=False, text_heads=2)
    images = torch.rand(2, 3, 32, 32)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": False, "text_cfg": {"heads": 2}, "vision_cfg": {"width": 128, "head_width": 32}},
         "preprocess_cfg": {"mean": [0.2, 0.3, 0.4], "std": [0.25, 0.2, 0.3]}}))
    ours = load_pretrained_clip(path)
    assert ours.hparams.vision["heads"] == 4 and ours.hparams.vision["image_mean"] == [0.2, 0.3, 0.4]
    mean, std = torch.tensor([0.2, 0.3, 0.4])[:, None, None], torch.tensor([0.25, 0.2, 0.3])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images * 2 - 1), ref.encode_image((images - mean) / std,
                                                                                        normalize=True), **TOL)


def test_clip_from_hugging_face_folder_equals_transformers(tmp_path):
    ref = tiny_hf_clip()
    ref.save_pretrained(tmp_path / "hf")
    write_hf_tokenizer_files(tmp_path / "tok").save_pretrained(tmp_path / "hf")  # tokenizer.json + config
    ours = load_pretrained_clip(tmp_path / "hf")

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenize(CAPTIONS), ids)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        hidden = ref.text_model(input_ids=ids).last_hidden_state  # SD conditions on these, without a padding mask
        text_ref = F.normalize(pooled(ref.get_text_features(input_ids=ids)), dim=-1)
        image_ref = F.normalize(pooled(ref.get_image_features(pixel_values=openai_pixels(images))), dim=-1)
        token_features, text_ours = ours.encode_text(ids)
        image_ours = ours.encode_image(images * 2 - 1)
    torch.testing.assert_close(token_features, hidden, **TOL)
    torch.testing.assert_close(text_ours, text_ref, **TOL)
    torch.testing.assert_close(image_ours, image_ref, **TOL)


@pytest.mark.parametrize("prefix", ["", "text_model."])  # how transformers 5 / 4 name a CLIPTextModel's weights
def test_text_encoder_of_a_diffusers_pipeline_folder_equals_transformers(tmp_path, prefix):
    """Stable Diffusion's layout: text_encoder/ (CLIPTextModel, no projection) beside tokenizer/ (vocab + merges)."""
    torch.manual_seed(0)
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77)).eval()
    folder = tmp_path / "sd" / "text_encoder"
    text_model.save_pretrained(folder)
    weights = safetensors_torch.load_file(str(folder / "model.safetensors"))
    weights = {(k if k.startswith("text_model.") else prefix + k): v for k, v in weights.items()}
    safetensors_torch.save_file(weights, str(folder / "model.safetensors"))
    # config.json may leave out what equals transformers' defaults (vocabulary, context, activation, eps)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "hidden_size": 32,
                                                    "intermediate_size": 64, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2}))
    tokenizer = write_hf_tokenizer_files(tmp_path / "sd" / "tokenizer")
    (tmp_path / "sd" / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    ours = load_pretrained_clip(tmp_path / "sd")

    ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenize(CAPTIONS), ids)
    with torch.no_grad():
        out = text_model(input_ids=ids)
        token_features, text_ours = ours.encode_text(ids)
    torch.testing.assert_close(token_features, out.last_hidden_state, **TOL)
    torch.testing.assert_close(text_ours, F.normalize(out.pooler_output, dim=-1), **TOL)
    with pytest.raises(ValueError, match="text encoder alone"):
        ours.encode_image(torch.zeros(1, 3, 32, 32))


def test_bad_clip_inputs_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in tiny_open_clip().state_dict().items()}
    wrong = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file({**state, "text_projection": torch.zeros(64, 16)}, str(wrong))
    with pytest.raises(PretrainedError, match=r"wrong\.safetensors: model\.text\.text_projection has shape"):
        load_pretrained_clip(wrong, quick_gelu=True, text_heads=2, vision_heads=2)
    extra = tmp_path / "extra.safetensors"
    safetensors_torch.save_file({**state, "visual.attn_pool.query": torch.zeros(2)}, str(extra))
    with pytest.raises(PretrainedError, match=r"extra\.safetensors: unexpected weight model\.visual\.attn_pool"):
        load_pretrained_clip(extra, quick_gelu=True, text_heads=2, vision_heads=2)
    missing = tmp_path / "missing.safetensors"
    safetensors_torch.save_file({k: v for k, v in state.items() if k != "ln_final.bias"}, str(missing))
    with pytest.raises(PretrainedError, match=r"missing\.safetensors: no weights for model\.text\.ln_final\.bias"):
        load_pretrained_clip(missing, quick_gelu=True, text_heads=2, vision_heads=2)
    vae = tmp_path / "vae.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tiny_diffusers_vae().state_dict().items()}, str(vae))
    with pytest.raises(PretrainedError, match=r"vae\.safetensors: no visual\.class_embedding"):
        load_pretrained_clip(vae, quick_gelu=True)
    ref = tiny_hf_clip()
    ref.save_pretrained(tmp_path / "hf")
    with pytest.raises(PretrainedError, match=r"hf: no tokenizer\.json or vocab\.json"):
        load_pretrained_clip(tmp_path / "hf")


# ----------------------------------------------------------------------------------- checkpoints and training
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Stage checkpoints written by `lit-diffusion import` from a diffusers VAE and a Hugging Face CLIP (16 px)."""
    root = tmp_path_factory.mktemp("imported")
    tiny_diffusers_vae().save_pretrained(root / "vae")
    tiny_hf_clip(image_size=16).save_pretrained(root / "clip")
    write_hf_tokenizer_files(root / "tok").save_pretrained(root / "clip")
    cli_main(["import", "vae", str(root / "vae"), "--out", str(root / "vae.ckpt")])
    cli_main(["import", "clip", str(root / "clip"), "--out", str(root / "clip.ckpt")])
    return {"vae": root / "vae.ckpt", "clip": root / "clip.ckpt", "root": root}


def test_imported_checkpoints_load_as_stages_with_the_same_outputs(imported):
    vae = VAEModule.from_checkpoint(imported["vae"])  # torch.load(weights_only=True) inside
    direct = load_pretrained_vae(imported["root"] / "vae")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(images), direct.encode(images), rtol=0, atol=0)
    assert float(vae.scale_factor) == pytest.approx(0.18215) and vae.latent_scale_measured
    clip = CLIPModule.from_checkpoint(imported["clip"])
    direct = load_pretrained_clip(imported["root"] / "clip")
    assert torch.equal(clip.tokenize(CAPTIONS), direct.tokenize(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(clip.tokenize(CAPTIONS))[1],
                                   direct.encode_text(direct.tokenize(CAPTIONS))[1], rtol=0, atol=0)
    block = torch.load(imported["clip"], weights_only=True)["lit_diffusion"]
    assert block["imported_from"] == str(imported["root"] / "clip")


def test_imported_checkpoints_train_a_diffusion_model_and_sample(imported, shapes_data, tmp_path):
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    torch.manual_seed(0)
    model = LatentDiffusionModule(clip_ckpt=str(imported["clip"]), vae_ckpt=str(imported["vae"]), image_size=16,
                                  unet=TINY_UNET, sample_steps=3, warmup_steps=0)
    assert model.clip.text_width == 32 and model.latent_size == 4  # the HF text width; f=4
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    _fit(model, tiny_datamodule(shapes_data, batch_size=8), 3, tmp_path)
    assert any(not torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())  # the U-Net trained
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in frozen.items())  # CLIP stayed frozen
    randomise_unet(model)
    images = model.sample(["a large red circle", "a small blue square"], guidance=3.0, seed=[0, 1])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    # the mask covers the real tokens and the end-of-text token, although HF pads with the end-of-text id
    cond = model.encode_prompts(["a large red circle"])
    assert int(cond.mask.sum()) == len(model.clip.tokenizer.encode("a large red circle")) + 2


def test_fine_tuning_clip_from_an_imported_checkpoint_lowers_its_loss(imported, shapes_data, tmp_path):
    torch.manual_seed(0)
    module = CLIPModule(init_from=str(imported["clip"]), lr=1e-3, warmup_steps=0, tokenizer_path=None)
    start = CLIPModule.from_checkpoint(imported["clip"])
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in start.state_dict().items())  # weights loaded
    assert module.hparams.vision["image_mean"] is not None  # the architecture is the checkpoint's

    data = tiny_datamodule(shapes_data, batch_size=32)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))

    def loss():
        module.eval()
        with torch.no_grad():
            return float(module.model_step(batch, module.local_loss_fn)[0])

    before = loss()
    module.train()
    _fit(module, tiny_datamodule(shapes_data, batch_size=32), 15, tmp_path)
    after = loss()
    assert after < before - 0.1, (before, after)


def test_init_from_refuses_a_checkpoint_of_another_kind_or_shape(imported, tmp_path):
    with pytest.raises(CheckpointError, match=r"vae\.ckpt is a 'vae' checkpoint, expected a 'clip' checkpoint"):
        CLIPModule(init_from=str(imported["vae"]))
    ckpt = torch.load(imported["vae"], weights_only=True)
    ckpt["state_dict"]["vae.decoder.conv_out.bias"] = torch.zeros(5)
    torch.save(ckpt, tmp_path / "bad_vae.ckpt")
    with pytest.raises(CheckpointError, match=r"bad_vae\.ckpt: VAE weights do not fit .*decoder\.conv_out\.bias"):
        VAEModule(init_from=str(tmp_path / "bad_vae.ckpt"))
    del ckpt["state_dict"]["vae.decoder.conv_out.bias"]
    torch.save(ckpt, tmp_path / "short_vae.ckpt")
    with pytest.raises(CheckpointError, match=r"short_vae\.ckpt: VAE weights missing .*vae\.decoder\.conv_out\.bias"):
        VAEModule(init_from=str(tmp_path / "short_vae.ckpt"))
    vae = VAEModule(init_from=str(imported["vae"]), lr=1e-4)
    assert vae.config.quant_conv and float(vae.scale_factor) == pytest.approx(0.18215)


def test_pipeline_uses_a_named_checkpoint_instead_of_training(imported, tmp_path):
    import yaml

    from lit_diffusion.pipeline import load_config, place_given_checkpoints, run_stage

    cfg = load_config("configs/pipeline/pretrained.yaml")
    assert cfg["stages"]["clip"]["checkpoint"] and cfg["stages"]["vae"]["checkpoint"]
    for stage in ("clip", "vae"):
        cfg["stages"][stage]["checkpoint"] = str(imported[stage])
    place_given_checkpoints(cfg, tmp_path)
    for stage in ("clip", "vae"):  # where a finished stage's checkpoint goes, byte for byte
        assert (tmp_path / f"{stage}.ckpt").read_bytes() == imported[stage].read_bytes()
        out = run_stage(stage, cfg, tmp_path, "run", {}, {})
        assert out["skipped"] and out["ckpt"] == str(tmp_path / f"{stage}.ckpt") and not (tmp_path / stage).exists()
    place_given_checkpoints(cfg, tmp_path)  # again: nothing changes
    # a byte-equal copy in place (placed from another file system) is the same checkpoint; another one is refused
    (tmp_path / "vae.ckpt").unlink()
    (tmp_path / "vae.ckpt").write_bytes(imported["vae"].read_bytes())
    place_given_checkpoints(cfg, tmp_path)
    trained = torch.load(imported["vae"], map_location="cpu", weights_only=True)
    trained["global_step"] = 1234  # as if trained here
    (tmp_path / "vae.ckpt").unlink()
    torch.save(trained, tmp_path / "vae.ckpt")
    here = (tmp_path / "vae.ckpt").read_bytes()
    with pytest.raises(ValueError, match=rf"\[vae\] {tmp_path / 'vae.ckpt'} holds another vae checkpoint than the "
                                         rf"given {imported['vae']}"):
        place_given_checkpoints(cfg, tmp_path)
    assert (tmp_path / "vae.ckpt").read_bytes() == here
    cfg["stages"]["vae"]["checkpoint"] = str(imported["clip"])
    with pytest.raises(CheckpointError, match=r"clip\.ckpt is a 'clip' checkpoint, expected a 'vae' checkpoint"):
        place_given_checkpoints(cfg, tmp_path)
    bad = {**cfg, "stages": {**cfg["stages"], "ldm": {"checkpoint": str(imported["vae"])}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"stages\.ldm\.checkpoint: only \['clip', 'vae'\]"):
        load_config(tmp_path / "bad.yaml")


def test_a_given_vae_beside_a_clip_trained_here_is_not_taken_for_stale(imported, tmp_path):
    """Our own CLIP trained by the pipeline and a VAE given as a checkpoint (a published one, or one trained
    elsewhere): the VAE is not made from the CLIP, so the CLIP's training does not make it stale; a VAE the
    pipeline trained before would be."""
    from lit_diffusion.pipeline import StageInputsChanged, check_stage_inputs, load_config, place_given_checkpoints

    cfg = load_config("configs/pipeline/pretrained.yaml")
    cfg["stages"]["clip"] = {"config": "configs/clip/shapes.yaml"}
    cfg["stages"]["vae"]["checkpoint"] = str(imported["vae"])
    place_given_checkpoints(cfg, tmp_path)
    assert (tmp_path / "vae.ckpt").is_file() and not (tmp_path / "clip.ckpt").exists()
    stages = {s: {} for s in ("clip", "vae", "ldm", "prior")}
    check_stage_inputs(cfg, tmp_path, stages, stages)  # the CLIP will train; the given VAE stays as it is
    cfg["stages"]["vae"] = {"config": "configs/vae/shapes.yaml"}  # the same file, now as this pipeline's own VAE
    with pytest.raises(StageInputsChanged, match=r"\[vae\] .*vae\.ckpt was made from a clip\.ckpt that is missing"):
        check_stage_inputs(cfg, tmp_path, stages, stages)
