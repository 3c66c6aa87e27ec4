"""Stage 1 to Hugging Face and open_clip: a CLIP stage checkpoint written as a transformers `CLIPModel` folder or as
an open_clip checkpoint with its model config, the inverse of `pretrained.clip` (which imports both).

transformers (`export_transformers`): config.json (`CLIPConfig`), model.safetensors, preprocessor_config.json and
a fast tokenizer (tokenizer.json + tokenizer_config.json) built from our own tokenizer.json: the same normaliser,
pre-tokenizer and BPE, with SOT / EOT added around each caption by a post-processor, truncated to our context
length keeping the EOT, padded with our pad token. So `AutoTokenizer.from_pretrained(DIR)(captions,
padding="max_length", truncation=True)` gives our token ids, and `CLIPModel.from_pretrained(DIR)` our embeddings.

open_clip (`export_open_clip`): open_clip_model.safetensors, open_clip_config.json (model_cfg + preprocess_cfg, what
`open_clip.create_model_and_transforms("local-dir:DIR")` and `get_tokenizer("local-dir:DIR")` read), the same
model config alone as DIR/NAME.json (for `open_clip.add_model_config(DIR / "NAME.json")` and
`create_model_and_transforms("NAME", pretrained=DIR / "open_clip_model.safetensors")`, NAME being the folder's
name), and the tokenizer files, which open_clip reads through its `HFTokenizer` (that runs ftfy and html.unescape on
a caption first: captions holding HTML entities or mis-encoded text can tokenize differently). A CLIP that still
has OpenAI's tokenizer (imported from OpenAI / open_clip) keeps open_clip's own `SimpleTokenizer` instead.

Our towers are the pre-LN Transformers both libraries implement; what must line up is an option away:
  vision.pool 'cls' (class token, ln_post on it)  open_clip pool_type 'tok'; transformers' pooler. 'mean': refused
  vision.frames > 1 (a video tower)               refused: both hold image towers only
  text_only (no image tower)                      refused: both hold a CLIP with both towers
  text pooled at the first EOT                    open_clip pool_type 'eos' with eos_id; transformers eos_token_id
                                                  (but its id 2 means "argmax" to transformers: refused)
  quick_gelu per tower                            transformers: hidden_act per tower; open_clip: one flag for both
                                                  (towers that differ are refused)
  dropout (attention)                             transformers: attention_dropout; open_clip has none (exported,
                                                  warned: identical in eval)
  pixels: ours reads [-1, 1] images, i.e. [0, 1] ones normalised with mean 0.5 and std 0.5 (or vision.image_mean /
  image_std for imported weights); those go into the exported preprocessing config
  logit scale: ours is clamped at exp(max_logit_scale); the clamped value is exported (the parameter itself,
  whenever clamp_logit_scale_ has run, which training does after every step)

Key names, ours -> open_clip / transformers (text side; the image side alike under visual. / vision_model.):
  text.transformer.blocks.i                       -> transformer.resblocks.i / text_model.encoder.layers.i
      ln_1, ln_2                                  ->     ln_1, ln_2 / layer_norm1, layer_norm2
      attn.qkv                                    ->     attn.in_proj_{weight,bias} / self_attn.{q,k,v}_proj
      attn.proj, mlp.fc, mlp.proj                 ->     attn.out_proj, mlp.c_fc, mlp.c_proj / self_attn.out_proj,
                                                         mlp.fc1, mlp.fc2
  text.token_embedding, positional_embedding      -> the same / text_model.embeddings.{token,position}_embedding
  text.ln_final                                   -> ln_final / text_model.final_layer_norm
  text.text_projection [W, E]                     -> text_projection / text_projection.weight [E, W] (transposed)
  visual.conv1, class_embedding, positional_embedding, ln_pre, ln_post, proj
                                                  -> the same / vision_model.embeddings.patch_embedding,
                                                     class_embedding, position_embedding.weight, pre_layrnorm,
                                                     post_layernorm, visual_projection.weight (transposed)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import Tensor

from lit_diffusion.data.tokenizer import EOT, SOT, Tokenizer
from lit_diffusion.export import ExportError, prepare_folder, save_safetensors, write_json
from lit_diffusion.pretrained import require
from lit_diffusion.stages.base import CheckpointError
from lit_diffusion.stages.clip import CLIPModule

log = logging.getLogger("lit_diffusion")

TARGETS = {"transformers": "transformers' CLIPModel", "open_clip": "open_clip's CLIP"}
OUR_PIXELS = [0.5, 0.5, 0.5]  # [-1, 1] = ([0, 1] - 0.5) / 0.5: the mean and std of our own CLIP's input
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our towers use
HF_WEIGHTS = "model.safetensors"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip looks for in a local-dir: folder
OPEN_CLIP_CONFIG = "open_clip_config.json"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]

_TO_OPEN_CLIP = [
    (r"^text\.transformer\.blocks\.", "transformer.resblocks."),
    (r"^visual\.transformer\.blocks\.", "visual.transformer.resblocks."),
    (r"\.attn\.qkv\.weight$", ".attn.in_proj_weight"),
    (r"\.attn\.qkv\.bias$", ".attn.in_proj_bias"),
    (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.mlp\.fc\.", ".mlp.c_fc."),
    (r"\.mlp\.proj\.", ".mlp.c_proj."),
    (r"^text\.(token_embedding|positional_embedding|ln_final|text_projection)", r"\1"),
]
_TO_HF = [
    (r"^text\.transformer\.blocks\.", "text_model.encoder.layers."),
    (r"^visual\.transformer\.blocks\.", "vision_model.encoder.layers."),
    (r"\.attn\.(q|k|v)\.", r".self_attn.\1_proj."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.fc\.", ".mlp.fc1."),
    (r"\.mlp\.proj\.", ".mlp.fc2."),
    (r"^text\.token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^text\.positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^text\.ln_final\.", "text_model.final_layer_norm."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
]


# ----------------------------------------------------------------------------------------------------- checks
def check_exportable(module: CLIPModule, target: str) -> None:
    """Refuse, naming the field, a CLIP that `target` ("transformers" or "open_clip") cannot compute as ours does."""
    what = TARGETS[target]
    if module.model.visual is None:
        raise ExportError(f"text_only = True: a text encoder without its image tower; {what} holds both towers "
                          f"(export the CLIP it was imported from instead)")
    vision, text = module.model.visual.cfg, module.model.text.cfg
    if vision.frames > 1:
        raise ExportError(f"vision.frames = {vision.frames}: a video CLIP (tubelet embedding over frames, temporal "
                          f"positions); {what} embeds single images only")
    if vision.pool != "cls":
        raise ExportError(f"vision.pool = {vision.pool!r}: {what} always has a class token and pools it; a tower "
                          f"without one cannot be expressed")
    if target == "open_clip" and vision.quick_gelu != text.quick_gelu:
        raise ExportError(f"vision.quick_gelu = {vision.quick_gelu} but text.quick_gelu = {text.quick_gelu}: "
                          f"{what} has one quick_gelu setting for both towers")
    if target == "open_clip" and (vision.dropout or text.dropout):
        log.warning("vision.dropout / text.dropout = %s / %s: open_clip's CLIP has no attention dropout; it embeds "
                    "as ours does in eval mode, but would fine-tune without it", vision.dropout, text.dropout)
    if target == "transformers" and text.eot_id == 2:
        raise ExportError("text.eot_id = 2 (the tokenizer's end-of-text id): transformers' CLIPTextModel reads "
                          "eos_token_id 2 as a legacy config and pools at the highest token id instead of the "
                          "end-of-text token")
    # open_clip tokenizes OpenAI's vocabulary itself; any other goes through a transformers tokenizer, as below
    if not pad_is_special(module.tokenizer) and not (target == "open_clip" and is_openai_tokenizer(module.tokenizer)):
        backend, _ = _backend(module.tokenizer)
        pad = backend.id_to_token(module.tokenizer.pad_id)
        raise ExportError(f"the tokenizer pads with id {module.tokenizer.pad_id} ({pad!r}), an ordinary vocabulary "
                          f"entry: a transformers tokenizer (which {what} would tokenize with) pads only with a "
                          f"special token, and making {pad!r} one would change how it tokenizes inside captions")


def clamped_logit_scale(module: CLIPModule) -> Tensor:
    """The logit scale our CLIP uses (`CLIP.scale()` clamps it), as the parameter the targets exponentiate."""
    return module.model.logit_scale.detach().clamp(max=module.model.max_logit_scale)


def pixel_stats(module: CLIPModule) -> tuple[list[float], list[float]]:
    """(mean, std) that normalise [0, 1] pixels into what our vision tower reads."""
    cfg = module.model.visual.cfg
    if cfg.image_mean is None:
        return list(OUR_PIXELS), list(OUR_PIXELS)
    return list(cfg.image_mean), list(cfg.image_std)


# ------------------------------------------------------------------------------------------------- tokenizers
def _backend(tokenizer: Tokenizer):
    """Our tokenizer's `tokenizers.Tokenizer` (from its saved JSON) and the parsed JSON itself."""
    from tokenizers import Tokenizer as HFTokenizer

    inner = json.loads(tokenizer.to_json())["tokenizer"]
    return HFTokenizer.from_str(inner), json.loads(inner)


def pad_is_special(tokenizer: Tokenizer) -> bool:
    """Whether the pad id is a special token: only those can pad in a transformers tokenizer without changing how
    the same text in a caption tokenizes (OpenAI's pad id 0 is "!")."""
    backend, _ = _backend(tokenizer)
    return any(t.special and i == tokenizer.pad_id for i, t in backend.get_added_tokens_decoder().items())


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> list[str]:
    """tokenizer.json + tokenizer_config.json: a transformers fast tokenizer giving our token ids, [SOT, pieces...,
    EOT, pad...] at our context length (with padding="max_length", truncation=True)."""
    from tokenizers import processors

    backend, blob = _backend(tokenizer)  # its pad token is special: `check_exportable`
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tokenizer.sot_id), (EOT, tokenizer.eot_id)])
    backend.no_padding()  # transformers pads and truncates at call time, to model_max_length
    backend.no_truncation()
    backend.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SOT, "eos_token": EOT,
              "pad_token": backend.id_to_token(tokenizer.pad_id), "model_max_length": tokenizer.context_length,
              "clean_up_tokenization_spaces": False}
    if blob["model"].get("unk_token"):
        config["unk_token"] = blob["model"]["unk_token"]
    write_json(config, out / "tokenizer_config.json")
    return list(TOKENIZER_FILES)


def is_openai_tokenizer(tokenizer: Tokenizer) -> bool:
    """Whether this is OpenAI's CLIP tokenizer as `pretrained.clip` imports it (vocabulary, merges, padding)."""
    from lit_diffusion.pretrained.clip import open_clip_tokenizer

    openai = open_clip_tokenizer(tokenizer.context_length)
    return tokenizer.pad_id == openai.pad_id and _backend(tokenizer)[1] == _backend(openai)[1]


# ------------------------------------------------------------------------------------------------ state dicts
def _split_qkv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our fused in-projections `attn.qkv` [3W, ...] -> `attn.q`, `attn.k`, `attn.v` [W, ...] (q, k, v stacked in
    that order, as nn.MultiheadAttention's in_proj)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"(.*\.attn\.)qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m.group(1)}{name}.{m.group(2)}"] = part
        else:
            out[key] = value
    return out


def _model_state(module: CLIPModule) -> dict[str, Tensor]:
    state = dict(module.model.state_dict())
    state["logit_scale"] = clamped_logit_scale(module)
    return state


def to_open_clip_state_dict(module: CLIPModule) -> dict[str, Tensor]:
    """Our CLIP's weights -> open_clip's `CLIP` names (shapes are the same)."""
    out = {}
    for key, value in _model_state(module).items():
        for pattern, repl in _TO_OPEN_CLIP:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def hf_names(state: dict[str, Tensor], out: dict[str, Tensor], towers: tuple[str, ...], what: str) -> dict:
    """`state` (our names, q/k/v split) renamed into transformers' and added to `out`; a name outside `towers`
    (e.g. "text_model.") is refused naming `what` (the transformers class)."""
    for key, value in state.items():
        for pattern, repl in _TO_HF:
            key = re.sub(pattern, repl, key)
        if not key.startswith(towers):
            raise ExportError(f"no transformers {what} weight for our {key}")
        out[key] = value
    return out


def to_hf_state_dict(module: CLIPModule) -> dict[str, Tensor]:
    """Our CLIP's weights -> transformers' `CLIPModel` names; projections transposed into Linear weights [E, W]."""
    state = _split_qkv(_model_state(module))
    out = {"text_projection.weight": state.pop("text.text_projection").T,
           "visual_projection.weight": state.pop("visual.proj").T,
           "logit_scale": state.pop("logit_scale")}
    return hf_names(state, out, ("text_model.", "vision_model."), "CLIPModel")


# ---------------------------------------------------------------------------------------------------- configs
def _act(quick_gelu: bool) -> str:
    return "quick_gelu" if quick_gelu else "gelu"  # transformers' "gelu" is the exact (erf) GELU, as F.gelu


def hf_config(module: CLIPModule):
    """transformers' `CLIPConfig` for this CLIP."""
    transformers = require("transformers", "exporting a CLIP to transformers")
    vision, text, tok = module.model.visual.cfg, module.model.text.cfg, module.tokenizer
    embed_dim = module.model.embed_dim
    text_cfg = dict(vocab_size=text.vocab_size, hidden_size=text.width,
                    intermediate_size=int(text.width * text.mlp_ratio), num_hidden_layers=text.layers,
                    num_attention_heads=text.heads, max_position_embeddings=text.context_length,
                    hidden_act=_act(text.quick_gelu),
                    layer_norm_eps=LAYER_NORM_EPS, attention_dropout=text.dropout, projection_dim=embed_dim,
                    pad_token_id=tok.pad_id, bos_token_id=tok.sot_id, eos_token_id=tok.eot_id)
    vision_cfg = dict(hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
                      num_hidden_layers=vision.layers, num_attention_heads=vision.heads, image_size=vision.image_size,
                      patch_size=vision.patch_size, num_channels=3, hidden_act=_act(vision.quick_gelu),
                      layer_norm_eps=LAYER_NORM_EPS, attention_dropout=vision.dropout, projection_dim=embed_dim)
    config = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=embed_dim,
                                     logit_scale_init_value=float(clamped_logit_scale(module)))
    config.architectures = ["CLIPModel"]
    return config


def hf_preprocessor_config(module: CLIPModule) -> dict:
    """preprocessor_config.json: CLIP's preprocessing (resize the short side, centre crop, bicubic) to our size,
    normalised with our pixel statistics."""
    mean, std = pixel_stats(module)
    size = module.model.visual.cfg.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": mean, "image_std": std}


def open_clip_model_config(module: CLIPModule) -> dict:
    """open_clip's model config (`CLIP(**cfg)`): towers, text pooling at our end-of-text id."""
    vision, text, tok = module.model.visual.cfg, module.model.text.cfg, module.tokenizer
    return {
        "embed_dim": module.model.embed_dim,
        "quick_gelu": bool(text.quick_gelu),
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size, "width": vision.width,
                       "layers": vision.layers, "head_width": vision.width // vision.heads,
                       "mlp_ratio": vision.mlp_ratio},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
                     "pad_id": tok.pad_id, "eos_id": tok.eot_id, "pool_type": "eos"},
    }


# ---------------------------------------------------------------------------------------------------- exports
def export_transformers(module: CLIPModule, out: str | Path) -> dict:
    """Write `module` as a transformers CLIPModel folder `out`; returns a summary (files, how to load)."""
    check_exportable(module, "transformers")
    out = prepare_folder(out)
    files = write_hf_tokenizer(module.tokenizer, out)
    hf_config(module).save_pretrained(str(out))
    save_safetensors(to_hf_state_dict(module), out / HF_WEIGHTS)
    write_json(hf_preprocessor_config(module), out / "preprocessor_config.json")
    return {"out": str(out), "to": "transformers",
            "files": ["config.json", HF_WEIGHTS, "preprocessor_config.json", *files],
            "load": f"transformers.CLIPModel.from_pretrained({str(out)!r}); "
                    f"transformers.AutoTokenizer.from_pretrained({str(out)!r})(captions, padding='max_length', "
                    f"truncation=True)"}


def export_open_clip(module: CLIPModule, out: str | Path) -> dict:
    """Write `module` as an open_clip checkpoint with its config in the folder `out`; returns a summary."""
    check_exportable(module, "open_clip")
    out = prepare_folder(out)
    name = out.resolve().name
    model_cfg = open_clip_model_config(module)
    files = []
    if pad_is_special(module.tokenizer):  # our own tokenizer, read by open_clip's HFTokenizer
        files = write_hf_tokenizer(module.tokenizer, out)
        # a local-dir: folder reads its tokenizer from itself; a config added with add_model_config from this name
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(out.resolve())
    # else OpenAI's (`check_exportable`): without hf_tokenizer_name open_clip uses its own SimpleTokenizer
    mean, std = pixel_stats(module)
    preprocess = {"size": module.model.visual.cfg.image_size, "mean": mean, "std": std, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    write_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, out / OPEN_CLIP_CONFIG)
    write_json(model_cfg, out / f"{name}.json")
    save_safetensors(to_open_clip_state_dict(module), out / OPEN_CLIP_WEIGHTS)
    weights = out / OPEN_CLIP_WEIGHTS
    return {"out": str(out), "to": "open_clip", "files": [OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG, f"{name}.json", *files],
            "load": f"open_clip.create_model_and_transforms('local-dir:{out}'); "
                    f"open_clip.get_tokenizer('local-dir:{out}')",
            "load_by_name": f"open_clip.add_model_config({str(out / f'{name}.json')!r}); "
                            f"open_clip.create_model_and_transforms({name!r}, pretrained={str(weights)!r}, "
                            f"image_mean={mean}, image_std={std})"}


def export_clip_checkpoint(ckpt: str | Path, to: str, out: str | Path) -> dict:
    """`export_transformers` or `export_open_clip` (`to`) of the CLIP stage checkpoint `ckpt` (clip.ckpt)."""
    if to not in TARGETS:
        raise ExportError(f"a CLIP exports to one of {sorted(TARGETS)}, not {to!r}")
    try:
        module = CLIPModule.from_checkpoint(ckpt)
    except CheckpointError as err:
        raise ExportError(f"{err} ({TARGETS[to]} is exported from a CLIP stage checkpoint, clip.ckpt)") from err
    return (export_transformers if to == "transformers" else export_open_clip)(module, out)
