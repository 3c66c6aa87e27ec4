"""Stage 1 from published weights: OpenAI / open_clip CLIP (a state dict such as open_clip's ViT-B-32, or OpenAI's
TorchScript file) and Hugging Face `CLIPModel` / `CLIPTextModel(WithProjection)` folders, converted into our
`models.clip.CLIP`, with the tokenizer those weights were trained with rebuilt as our `Tokenizer`.

The towers are the same pre-LN Transformers; what differs is an option away (`quick_gelu`, OpenAI's pixel
normalisation) or a name away. Key names, open_clip / HF -> ours (text side; the image side alike under visual.):

  transformer.resblocks.i / text_model.encoder.layers.i          -> text.transformer.blocks.i
      ln_1, ln_2 / layer_norm1, layer_norm2                      ->     ln_1, ln_2
      attn.in_proj_{weight,bias} / self_attn.{q,k,v}_proj        ->     attn.qkv  (HF: q, k, v stacked)
      attn.out_proj / self_attn.out_proj                         ->     attn.proj
      mlp.c_fc, mlp.c_proj / mlp.fc1, mlp.fc2                    ->     mlp.fc, mlp.proj
  token_embedding / text_model.embeddings.token_embedding        -> text.token_embedding
  positional_embedding / ...embeddings.position_embedding.weight -> text.positional_embedding
  ln_final / text_model.final_layer_norm                         -> text.ln_final
  text_projection [W, E] / text_projection.weight [E, W]         -> text.text_projection [W, E]  (HF: transposed)
  visual.conv1, class_embedding, ln_pre, ln_post, proj           -> the same (HF: patch_embedding, pre_layrnorm,
                                                                    post_layernorm, visual_projection.weight^T)

Pooling at the end-of-text token is ours already (the first EOT, which is OpenAI's argmax when EOT is the top id).
Heads are not in a state dict: OpenAI's text and image towers and open_clip's text towers use 64-wide heads,
the default here; an open_clip file's image heads come from its open_clip_config.json or `vision_heads`.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from lit_diffusion.data.tokenizer import EOT, SOT, Tokenizer
from lit_diffusion.models.clip import CLIP_MEAN, CLIP_STD
from lit_diffusion.pretrained import require
from lit_diffusion.pretrained.weights import PretrainedError, load_exactly, read_state_dict
from lit_diffusion.stages.clip import CLIPModule

HEAD_WIDTH = 64
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# OpenAI's files carry these scalars beside the weights; open_clip keeps a causal mask buffer in older versions
_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# CLIP's pre-tokenizer (OpenAI's `SimpleTokenizer` regex; open_clip and HF use the same)
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# ------------------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the base alphabet of the byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A `tokenizers.Tokenizer` that splits text exactly as CLIP's BPE does: NFC, whitespace runs -> one space,
    lowercase, CLIP's regex, byte-level alphabet, BPE with `</w>` marking a word's last piece (what transformers'
    CLIPTokenizerFast builds from the same vocab.json / merges.txt)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                 unk_token=EOT, fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SOT, EOT])
    return tok


@lru_cache(maxsize=1)
def _open_clip_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """OpenAI's BPE vocabulary as open_clip ships it in its wheel (`bpe_simple_vocab_16e6.txt.gz`), built as its
    `SimpleTokenizer` does: 256 bytes, the same with `</w>`, 48,894 merges, then SOT and EOT (49,408 ids)."""
    open_clip_tokenizer = require("open_clip.tokenizer", "the open_clip / OpenAI CLIP tokenizer")
    path = Path(open_clip_tokenizer.default_bpe())
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [SOT, EOT]
    return tuple((t, i) for i, t in enumerate(tokens)), tuple(merges)


def open_clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """OpenAI's tokenizer (the one open_clip's `tokenize` uses for every OpenAI-style CLIP); pads with 0 as it does."""
    vocab, merges = _open_clip_vocab()
    return Tokenizer(clip_bpe_tokenizer(dict(vocab), list(merges)), context_length, pad_id=0)


def _special(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def hf_tokenizer(folder: Path, context_length: int) -> Tokenizer:
    """The tokenizer of a Hugging Face folder (its own tokenizer.json, else vocab.json + merges.txt), padding with
    the folder's pad token as `CLIPTokenizer(..., padding="max_length")` does."""
    from tokenizers import Tokenizer as HFTokenizer

    candidates = [folder, folder / "tokenizer", folder.parent / "tokenizer"]  # a pipeline's text_encoder/ sibling
    where = next((d for d in candidates if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()), None)
    if where is None:
        raise PretrainedError(f"{folder}: no tokenizer.json or vocab.json + merges.txt (looked in "
                              f"{[str(c) for c in candidates]})")
    if (where / "tokenizer.json").is_file():
        tok = HFTokenizer.from_file(str(where / "tokenizer.json"))
        tok.no_padding()  # our Tokenizer adds SOT / EOT, truncates and pads itself
        tok.no_truncation()
        tok.post_processor = None
    else:
        vocab = json.loads((where / "vocab.json").read_text(encoding="utf-8"))
        lines = (where / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tok = clip_bpe_tokenizer(vocab, merges)
    pad = EOT
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (where / name).is_file():
            pad = _special(json.loads((where / name).read_text()).get("pad_token")) or pad
            break
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise PretrainedError(f"{where}: pad token {pad!r} is not in the vocabulary")
    if tok.token_to_id(SOT) is None or tok.token_to_id(EOT) is None:
        raise PretrainedError(f"{where}: not a CLIP tokenizer (no {SOT} / {EOT} tokens)")
    return Tokenizer(tok, context_length, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------- conversions
def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise PretrainedError(f"{source}: no weight {key}: not a CLIP of the OpenAI / open_clip layout")
    return tuple(state[key].shape)


def _count(state: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def convert_open_clip(state: dict[str, Tensor], source: str, quick_gelu: bool, text_heads: int | None = None,
                      vision_heads: int | None = None, image_mean=None, image_std=None) -> tuple[dict, dict[str, Tensor]]:
    """An OpenAI / open_clip CLIP state dict -> (CLIPModule config, our state dict under `model.`); `image_mean` /
    `image_std`: the pixel statistics it was trained with (None: OpenAI's)."""
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in _IGNORED}
    if "visual.class_embedding" not in state:
        raise PretrainedError(f"{source}: no visual.class_embedding: only ViT CLIPs with a class token convert "
                              f"(not ResNet / attention-pooling image towers)")
    v_width, _, patch, _ = _shape(state, "visual.conv1.weight", source)
    grid = round((_shape(state, "visual.positional_embedding", source)[0] - 1) ** 0.5)
    t_width = _shape(state, "ln_final.weight", source)[0]
    vision = dict(image_size=grid * patch, patch_size=patch, width=v_width, heads=vision_heads or v_width // HEAD_WIDTH,
                  layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
                  mlp_ratio=_shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source)[0] / v_width,
                  pool="cls", quick_gelu=quick_gelu, image_mean=list(image_mean or CLIP_MEAN),
                  image_std=list(image_std or CLIP_STD))
    text = dict(vocab_size=_shape(state, "token_embedding.weight", source)[0],
                context_length=_shape(state, "positional_embedding", source)[0], width=t_width,
                heads=text_heads or t_width // HEAD_WIDTH, layers=_count(state, r"transformer\.resblocks\.(\d+)\."),
                mlp_ratio=_shape(state, "transformer.resblocks.0.mlp.c_fc.weight", source)[0] / t_width,
                quick_gelu=quick_gelu)
    config = dict(vision=vision, text=text, embed_dim=_shape(state, "text_projection", source)[1])
    rules = [(r"^transformer\.resblocks\.", "text.transformer.blocks."),
             (r"^visual\.transformer\.resblocks\.", "visual.transformer.blocks."),
             (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"), (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
             (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.c_fc\.", ".mlp.fc."), (r"\.mlp\.c_proj\.", ".mlp.proj."),
             (r"^(token_embedding|positional_embedding|ln_final|text_projection)", r"text.\1")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out["model." + key] = value
    return config, out


def _hf_config(folder: Path) -> dict:
    """config.json as transformers reads it: values left at their defaults (which config.json may omit) filled
    in, older layouts (text_config_dict) upgraded."""
    path = folder / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no config.json (expected a Hugging Face CLIP folder)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") not in ("clip", "clip_text_model"):
        what = raw.get("model_type") or raw.get("_class_name")
        raise PretrainedError(f"{path}: a {what!r} model, expected a CLIP ('clip' or 'clip_text_model')")
    transformers = require("transformers", f"reading {path}")
    return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True).to_dict()


def _hf_tower(cfg: dict, source: str, kind: str) -> dict:
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise PretrainedError(f"{source}: {kind}_config.hidden_act = {act!r}; only quick_gelu and gelu convert")
    if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise PretrainedError(f"{source}: {kind}_config.layer_norm_eps = {cfg['layer_norm_eps']}; ours is 1e-5")
    width = int(cfg["hidden_size"])
    return dict(width=width, layers=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
                mlp_ratio=int(cfg["intermediate_size"]) / width, quick_gelu=act == "quick_gelu")


def convert_hf(state: dict[str, Tensor], config: dict, source: str, image_mean=None,
               image_std=None) -> tuple[dict, dict[str, Tensor]]:
    """A transformers CLIPModel / CLIPTextModel(WithProjection) state dict and config.json -> (CLIPModule config,
    our state dict under `model.`). A text model without projection gets the identity as its projection (its
    pooled output is then HF's `pooler_output`), so nothing is left at random initialisation."""
    text_only = config.get("model_type") == "clip_text_model"
    text_cfg = config if text_only else config.get("text_config") or {}
    text = _hf_tower(text_cfg, source, "text")
    text.update(vocab_size=int(text_cfg["vocab_size"]), context_length=int(text_cfg["max_position_embeddings"]))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if text_only:  # transformers >= 5 saves a CLIPTextModel without the `text_model.` prefix that 4.x wrote
        state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                 for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for tower, ours in (("text_model", "text"), ("vision_model", "visual")):
        prefix = f"{tower}.encoder.layers."
        for i in range(_count(state, re.escape(prefix) + r"(\d+)\.")):
            src, dst = f"{prefix}{i}.", f"model.{ours}.transformer.blocks.{i}."
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{src}self_attn.{n}_proj.{kind}", None) for n in "qkv"]
                if any(p is None for p in parts):
                    raise PretrainedError(f"{source}: no weight {src}self_attn.q/k/v_proj.{kind}")
                out[f"{dst}attn.qkv.{kind}"] = torch.cat(parts)
            for theirs, mine in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.fc"), ("mlp.fc2", "mlp.proj")):
                for kind in ("weight", "bias"):
                    if f"{src}{theirs}.{kind}" in state:
                        out[f"{dst}{mine}.{kind}"] = state.pop(f"{src}{theirs}.{kind}")
    renames = {"text_model.embeddings.token_embedding.weight": "model.text.token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "model.text.positional_embedding",
               "vision_model.embeddings.class_embedding": "model.visual.class_embedding",
               "vision_model.embeddings.patch_embedding.weight": "model.visual.conv1.weight",
               "vision_model.embeddings.position_embedding.weight": "model.visual.positional_embedding",
               "logit_scale": "model.logit_scale"}
    for part in ("weight", "bias"):
        renames.update({f"text_model.final_layer_norm.{part}": f"model.text.ln_final.{part}",
                        f"vision_model.pre_layrnorm.{part}": f"model.visual.ln_pre.{part}",
                        f"vision_model.post_layernorm.{part}": f"model.visual.ln_post.{part}"})
    for theirs, mine in renames.items():
        if theirs in state:
            out[mine] = state.pop(theirs)
    if "text_projection.weight" in state:
        out["model.text.text_projection"] = state.pop("text_projection.weight").T  # Linear [E, W] -> [W, E]
    elif text_only:
        out["model.text.text_projection"] = torch.eye(text["width"])
    if "visual_projection.weight" in state:
        out["model.visual.proj"] = state.pop("visual_projection.weight").T
    embed_dim = out["model.text.text_projection"].shape[1] if "model.text.text_projection" in out else None
    if text_only:
        out.setdefault("model.logit_scale", torch.tensor(float(config.get("logit_scale_init_value", 2.6592))))
        cfg = dict(vision=None, text=text, embed_dim=embed_dim, text_only=True)
    else:
        v = config.get("vision_config") or {}
        vision = _hf_tower(v, source, "vision")
        vision.update(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), pool="cls",
                      image_mean=list(image_mean or CLIP_MEAN), image_std=list(image_std or CLIP_STD))
        cfg = dict(vision=vision, text=text, embed_dim=int(config.get("projection_dim", embed_dim or 512)))
    out.update(state)  # whatever is left is unexpected, and named by load_exactly
    return cfg, out


# ----------------------------------------------------------------------------------------------- the importer
def _open_clip_config(path: Path) -> tuple[dict, dict]:
    """open_clip's `open_clip_config.json` beside a hub download: the model config the weights do not record, and
    the preprocessing (pixel mean and std) the model was trained with."""
    cfg_path = path.parent / "open_clip_config.json"
    full = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return full.get("model_cfg") or {}, full.get("preprocess_cfg") or {}


def load_pretrained_clip(source: str | Path, quick_gelu: bool | None = None, text_heads: int | None = None,
                         vision_heads: int | None = None) -> CLIPModule:
    """A `CLIPModule` holding the converted weights and the tokenizer of `source`: a Hugging Face folder
    (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, or a diffusers pipeline folder's text_encoder/), or an
    OpenAI / open_clip weight file. `quick_gelu` (open_clip files only): the activation, which a state dict does
    not record; None: from open_clip_config.json beside the file, or True for OpenAI's TorchScript files."""
    source = Path(source)
    if source.is_dir():
        folder = source / "text_encoder" if (source / "text_encoder" / "config.json").is_file() else source
        config = _hf_config(folder)
        weights = next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise PretrainedError(f"{folder}: none of {list(HF_WEIGHTS)} found")
        pre = folder / "preprocessor_config.json"
        pre = json.loads(pre.read_text()) if pre.is_file() else {}
        cfg, state = convert_hf(read_state_dict(weights), config, str(weights), pre.get("image_mean"),
                                pre.get("image_std"))
        tokenizer = hf_tokenizer(folder, cfg["text"]["context_length"])
        label = str(weights)
    else:
        state = read_state_dict(source)
        if any(k.startswith(("text_model.", "vision_model.")) for k in state):
            raise PretrainedError(f"{source}: Hugging Face CLIP weights: import the folder holding them and its "
                                  f"config.json, not the file")
        model_cfg, preprocess = _open_clip_config(source)
        if quick_gelu is None:
            quick_gelu = model_cfg.get("quick_gelu")
        if quick_gelu is None:
            if "input_resolution" not in state:  # only OpenAI's own files carry it
                raise PretrainedError(
                    f"{source}: the file does not record its activation: pass quick_gelu (--quick-gelu for OpenAI's "
                    f"weights and open_clip's *-quickgelu models, --no-quick-gelu for other open_clip models)")
            quick_gelu = True
        text_heads = text_heads or (model_cfg.get("text_cfg") or {}).get("heads")
        vision_cfg = model_cfg.get("vision_cfg") or {}
        if vision_heads is None and vision_cfg.get("width"):
            vision_heads = int(vision_cfg["width"]) // int(vision_cfg.get("head_width", HEAD_WIDTH))
        if vision_heads is None and "input_resolution" not in state and "visual.class_embedding" in state:
            # OpenAI's own files have 64-wide heads; open_clip's ViT-H (80), -g (88), -bigG (104) do not, and the
            # weights' shapes do not say: a wrong count loads without an error and embeds images wrongly
            raise PretrainedError(f"{source}: the file does not record its image tower's attention heads and has no "
                                  f"open_clip_config.json beside it: pass vision_heads (--vision-heads N: width / "
                                  f"head_width, e.g. 16 for open_clip's ViT-H-14, 12 for ViT-B)")
        cfg, state = convert_open_clip(state, str(source), bool(quick_gelu), text_heads, vision_heads,
                                       preprocess.get("mean"), preprocess.get("std"))
        # the tokenizer open_clip itself would use: the folder's own files where the config names a Hugging Face
        # tokenizer (`export --to open_clip` of a CLIP with our vocabulary), else OpenAI's
        own = bool((model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"))
        tokenizer = (hf_tokenizer(source.parent, cfg["text"]["context_length"]) if own
                     else open_clip_tokenizer(cfg["text"]["context_length"]))
        label = str(source)
    # the tokenizer fills in the vocabulary size, context length and end-of-text id; a tower of another size
    # then fails load_exactly's shape check, naming its embedding
    cfg["text"].update(vocab_size=None, context_length=None, eot_id=None)
    module = _module(cfg, tokenizer, label)
    load_exactly(module, state, label, prefix="model.")
    return module.eval()


def _module(cfg: dict, tokenizer: Tokenizer, source: str) -> CLIPModule:
    try:
        return CLIPModule(vision=cfg["vision"], text=cfg["text"], embed_dim=cfg["embed_dim"],
                          tokenizer_json=tokenizer.to_json(), text_only=bool(cfg.get("text_only", False)))
    except ValueError as err:
        raise PretrainedError(f"{source}: {err}") from err
