"""Stage 1: CLIP, trained contrastively on image-caption pairs; its text encoder later conditions the diffusion U-Net.

Validation embeds the whole val set, gathers it from every rank (uneven per-rank counts are fine) and reports:
- retrieval recall@1/@5 in both directions (`val/i2t_r*`: image -> caption, `val/t2i_r*`: caption -> image).
  Captions repeat (the shapes data has only a few hundred distinct captions), so an exact-index match would be
  ambiguous: a retrieval counts as correct when the retrieved item's caption string equals the query's caption.
  `val/r1_chance` / `val/r5_chance` are what a random ranking scores under that rule (same in both directions).
- zero-shot accuracy (`val/zeroshot_acc`) on single-object images: classify colour x shape among every
  combination from prompts (`zeroshot_templates`); a class scores the cosine of its best-matching prompt. The
  default prompt names the size too ("a {size} {color} {shape}", max over sizes): every training caption names
  one, and a size-less "a {color} {shape}" is out of distribution for the text encoder (measured on shapes after
  400 steps: 0.36 accuracy without the size, 0.34 averaging the two sizes' embeddings CLIP-style, 0.86 with the max).
- with `hard_negatives` (word swaps such as above <-> below): `val/negative_acc`, the fraction of val captions
  holding a swap word whose image scores its true caption above the swapped one (0.5: the swap goes unnoticed).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.utilities.distributed import gather_all_tensors

from lit_diffusion.data.negatives import WordSwaps
from lit_diffusion.data.shapes import COLORS, SHAPES, SIZES
from lit_diffusion.data.tokenizer import Tokenizer
from lit_diffusion.models.clip import CLIP, TextConfig, VisionConfig
from lit_diffusion.models.clip_loss import ClipLoss
from lit_diffusion.stages.common import CheckpointError, adamw_with_warmup, load_stage_checkpoint, stage_block

ZEROSHOT_CLASSES: list[tuple[str, str]] = [(c, s) for c in COLORS for s in SHAPES]


# ---------------------------------------------------------------------------------------------- metric helpers
def caption_ids(captions: Sequence[str]) -> Tensor:
    """Stable 63-bit hashes of caption strings [B], so equal captions can be compared across ranks as tensors."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little") >> 1
                         for c in captions], dtype=torch.long)


def zeroshot_label(attrs: dict | None) -> int:
    """Index into ZEROSHOT_CLASSES of a single-object image's (colour, shape); -1 for anything else."""
    objects = attrs.get("objects") if isinstance(attrs, dict) else None
    if not isinstance(objects, list) or len(objects) != 1 or not isinstance(objects[0], dict):
        return -1
    key = (objects[0].get("color"), objects[0].get("shape"))
    return ZEROSHOT_CLASSES.index(key) if key in ZEROSHOT_CLASSES else -1


@torch.no_grad()
def retrieval_recall(queries: Tensor, gallery: Tensor, query_ids: Tensor, gallery_ids: Tensor,
                     ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries [N, E] whose top-k gallery items [M, E] (cosine) include one with the query's id.

    Scores `chunk` queries at a time, so the [N, M] similarity matrix is never held whole."""
    k_max = min(max(ks), gallery.shape[0])
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ gallery.T  # [c, M]
        top = sims.topk(k_max, dim=1).indices  # [c, k_max]
        match = gallery_ids[top] == query_ids[start:start + chunk, None]  # [c, k_max]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
    return {k: hits[k] / max(queries.shape[0], 1) for k in ks}


def recall_chance(query_ids: Tensor, gallery_ids: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking: 1 - P(no match among k draws without replacement)."""
    n = gallery_ids.shape[0]
    matches = (query_ids[:, None] == gallery_ids[None, :]).sum(1).double()  # [N]
    out = {}
    for k in ks:
        miss = torch.ones_like(matches)
        for j in range(min(k, n)):
            miss = miss * ((n - matches - j) / (n - j)).clamp_min(0)
        out[k] = float((1 - miss).mean()) if len(matches) else 0.0
    return out


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate [n_r, ...] from every rank in rank order (n_r may differ by rank); identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(gather_all_tensors(x.contiguous()), dim=0)


# ------------------------------------------------------------------------------------------------- the stage
class CLIPModule(L.LightningModule):
    stage_kind = "clip"

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        embed_dim: int = 128,
        tokenizer_path: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        zeroshot_templates: Sequence[str] | None = ("a {size} {color} {shape}",),
        gather_with_grad: bool = True,
        tokenizer_json: str | None = None,
        hard_negatives: dict[str, str] | None = None,
        text_only: bool = False,
        init_from: str | None = None,
    ):
        """CLIP training stage.

        vision / text: `VisionConfig` / `TextConfig` fields (plain dicts accepted; checkpoints store dicts). The
            text vocabulary size, context length and end-of-text id come from the tokenizer.
        tokenizer_path: tokenizer.json (`lit-diffusion data shapes` writes one); its JSON travels in every
            checkpoint, so the file is not needed to load one.
        weight_decay: AdamW decay on matrices only (not biases, norms, class token or logit scale).
        zeroshot_templates: prompts with {color} and {shape} (and optionally {size}, expanded over every size)
            for val/zeroshot_acc; None or [] switches it off.
        gather_with_grad: contrast against the global batch with gradients through the all-gather (open_clip).
        tokenizer_json: the tokenizer itself instead of a path (used by `from_checkpoint`; not saved in hparams).
        hard_negatives: word pairs, e.g. {above: below, left: right}: every caption holding one of the words also
            yields a false caption with the words swapped, a negative for its image (NegCLIP; see `ClipLoss`).
            Without them CLIP reads captions as bags of words and the diffusion model it conditions cannot tell
            "A above B" from "A below B".
        text_only: no image tower (`vision` ignored): a text encoder imported alone conditions a diffusion model.
        init_from: a CLIP stage checkpoint (trained, or written by `lit-diffusion import clip`) to fine-tune: its
            architecture, tokenizer and weights replace vision / text / embed_dim / tokenizer_path. Not a
            hyper-parameter: this module's own checkpoints hold those weights, and rebuilding one needs no file.
        """
        super().__init__()
        init = None
        if init_from:
            from lit_diffusion.stages.common import CheckpointError, load_stage_checkpoint

            init = load_stage_checkpoint(init_from, "clip")
            config = init["lit_diffusion"].get("config") or {}
            vision, text = config.get("vision"), config.get("text")
            embed_dim, text_only = config.get("embed_dim", embed_dim), bool(config.get("text_only", False))
            tokenizer_json, tokenizer_path = init["lit_diffusion"].get("tokenizer"), None
            if tokenizer_json is None:
                raise CheckpointError(f"{init_from}: the CLIP checkpoint holds no tokenizer")
        if tokenizer_json is not None:
            tokenizer = Tokenizer.from_json(tokenizer_json)
        elif tokenizer_path:
            tokenizer = Tokenizer.load(tokenizer_path)
        else:
            raise ValueError("model.init_args.tokenizer_path is required "
                             "(a tokenizer.json, e.g. data/shapes/tokenizer.json)")
        if text_only:
            vision = None
        else:
            vision = VisionConfig(**vision) if isinstance(vision, dict) else (vision or VisionConfig())
        text = TextConfig(**text) if isinstance(text, dict) else (text or TextConfig())
        text = _fill_from_tokenizer(text, tokenizer, tokenizer_path or "the saved tokenizer")
        templates = list(zeroshot_templates or [])
        for t in templates:
            if "{color}" not in t or "{shape}" not in t:
                raise ValueError(f"model.init_args.zeroshot_templates: {t!r} needs both {{color}} and {{shape}}")
        hard_negatives = dict(hard_negatives or {})
        # checked here, so a bad pair fails at startup naming the option
        self.word_swaps = WordSwaps(hard_negatives, "model.init_args.hard_negatives") if hard_negatives else None
        # plain python only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "vision": None if vision is None else asdict(vision), "text": asdict(text), "embed_dim": int(embed_dim),
            "tokenizer_path": None if tokenizer_path is None else str(tokenizer_path), "lr": lr,
            "weight_decay": weight_decay, "betas": [float(b) for b in betas], "warmup_steps": warmup_steps,
            "zeroshot_templates": templates, "gather_with_grad": gather_with_grad,
            "hard_negatives": {str(k): str(v) for k, v in hard_negatives.items()},
        })
        self.hparams["text_only"] = bool(text_only)
        self.tokenizer = tokenizer
        self.model = CLIP(vision, text, embed_dim)
        self.embed_dim, self.text_width = int(embed_dim), text.width
        self.image_size = None if vision is None else vision.image_size
        self.train_loss_fn = ClipLoss()  # replaced in setup() with this rank's place in the world
        self.local_loss_fn = ClipLoss()  # validation: rank-local (ranks may see different numbers of batches)
        self.val_loss = MeanMetric()
        self._val: dict[str, list[Tensor]] = {}
        if init is not None:  # every weight, or an error naming what does not match
            missing, unexpected = self.load_state_dict(init.get("state_dict") or {}, strict=False)
            missing = [k for k in missing if not k.startswith("val_loss")]
            if missing or unexpected:
                raise CheckpointError(f"{init_from}: CLIP weights do not match its config (missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]})")

    # ---- public API used by the other stages ----
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.device)  # [B, L]

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, L] -> (token features [B, L, W], pooled [B, E] L2-normalised)."""
        return self.model.encode_text(tokens.to(self.device))

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, E] L2-normalised. Images of another size are centre-cropped to a
        square and resized to the tower's (antialiased bicubic, CLIP's preprocessing): a 256 px diffusion model's
        samples meet a 224 px CLIP in FID-with-CLIP-features and CLIP score."""
        size = self.image_size
        if size is None:
            return self.model.encode_image(images)  # raises: no image tower
        if images.shape[-2:] != (size, size):
            h, w = images.shape[-2:]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            images = F.interpolate(images[..., top:top + side, left:left + side].float(), size=(size, size),
                                   mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        return self.model.encode_image(images.to(self.device, self.model.visual.conv1.weight.dtype))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "CLIPModule":
        """The CLIP of a stage-1 checkpoint (read with weights_only=True), in eval mode."""
        return cls.from_checkpoint_dict(load_stage_checkpoint(path, "clip"), source=str(path)).to(map_location)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, source: str = "embedded CLIP checkpoint") -> "CLIPModule":
        """Rebuild from a checkpoint's parts: `lit_diffusion` block (config, tokenizer), `state_dict`."""
        block = ckpt.get("lit_diffusion") or {}
        if block.get("kind") != "clip":
            raise CheckpointError(f"{source} is a {block.get('kind')!r} checkpoint, expected a 'clip' checkpoint")
        if "tokenizer" not in block:
            raise CheckpointError(f"{source}: the CLIP checkpoint holds no tokenizer")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.update(block.get("config") or {})
        accepted = inspect.signature(cls.__init__).parameters
        hparams = {k: v for k, v in hparams.items() if k in accepted}
        hparams.update(tokenizer_json=block["tokenizer"], tokenizer_path=None)
        try:
            module = cls(**hparams)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: cannot rebuild CLIP from its saved config: {err}") from err
        state = ckpt.get("state_dict") or {}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("val_loss")]
        if missing or unexpected:
            raise CheckpointError(f"{source}: CLIP weights do not match its config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        return module.eval()

    # ---- training ----
    def setup(self, stage: str) -> None:
        self.train_loss_fn = ClipLoss(self.global_rank, self.trainer.world_size, self.hparams.gather_with_grad)

    def _text_tokens(self, captions: Sequence[str]) -> Tensor:
        tokens = self.tokenize(captions)
        # drop the all-padding tail: attention is causal, so the pooled end-of-text features do not change,
        # and short captions in a long context would otherwise spend most of the text compute on padding
        return tokens[:, : int(self.tokenizer.mask(tokens).sum(1).max())]

    def negative_embeddings(self, captions: Sequence[str]) -> tuple[Tensor, Tensor] | None:
        """(embeddings [B, E] of the swapped captions, zero where a caption has no swap word; mask [B] bool),
        or None without `hard_negatives`."""
        if self.word_swaps is None:
            return None
        swapped = [self.word_swaps(c) for c in captions]
        mask = torch.tensor([s is not None for s in swapped], device=self.device)
        negatives = torch.zeros(len(captions), self.embed_dim, device=self.device)
        if bool(mask.any()):
            _, embedded = self.model.encode_text(self._text_tokens([s for s in swapped if s is not None]))
            negatives = negatives.to(embedded.dtype).index_copy(0, mask.nonzero()[:, 0], embedded)
        return negatives, mask

    def model_step(self, batch: dict, loss_fn: ClipLoss) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple | None]:
        """-> (loss, image embeddings [B, E], text embeddings [B, E], logit scale, hard negatives or None)."""
        image, text, scale = self.model(batch["image"], self._text_tokens(batch["caption"]))
        negatives = self.negative_embeddings(batch["caption"])
        return loss_fn(image, text, scale, *(negatives or ())), image, text, scale, negatives

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _, _, scale, _ = self.model_step(batch, self.train_loss_fn)
        b = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/temperature", 1.0 / scale.detach(), batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.clamp_logit_scale_()

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup(self, self.parameters(), hp.lr, hp.weight_decay, tuple(hp.betas), hp.warmup_steps)

    # ---- validation ----
    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "ids": [], "zeroshot": [], "negative_win": []}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, image, text, _, negatives = self.model_step(batch, self.local_loss_fn)
        b = len(batch["caption"])
        self.val_loss.update(loss, weight=b)
        self.log("val/loss", self.val_loss, prog_bar=True, batch_size=b)
        attrs = batch.get("attrs") or [{}] * b
        self._val["image"].append(image.float())
        self._val["text"].append(text.float())
        self._val["ids"].append(caption_ids(batch["caption"]).to(self.device))
        self._val["zeroshot"].append(torch.tensor([zeroshot_label(a) for a in attrs], device=self.device))
        if negatives is not None:
            embedded, mask = negatives
            wins = (image * text).sum(1) > (image * embedded.to(image.dtype)).sum(1)  # [B]
            self._val["negative_win"].append(wins[mask].long())

    def _gathered(self, name: str, width: int | None) -> Tensor:
        parts = self._val.get(name) or []
        if parts:
            local = torch.cat(parts)
        else:  # this rank saw no val batch: still take part in the gather
            local = torch.empty((0, width) if width else (0,), device=self.device,
                                dtype=torch.float32 if width else torch.long)
        return gather_rows(local)

    def on_validation_epoch_end(self) -> None:
        image = self._gathered("image", self.embed_dim)  # [N, E], every rank's samples
        text = self._gathered("text", self.embed_dim)
        ids = self._gathered("ids", None)
        labels = self._gathered("zeroshot", None)
        negative_wins = self._gathered("negative_win", None)
        self._val = {}
        if image.shape[0] == 0:
            return
        metrics = {}
        i2t = retrieval_recall(image, text, ids, ids)
        t2i = retrieval_recall(text, image, ids, ids)
        chance = recall_chance(ids, ids)
        for k in (1, 5):
            metrics.update({f"val/i2t_r{k}": i2t[k], f"val/t2i_r{k}": t2i[k], f"val/r{k}_chance": chance[k]})
        zeroshot = self.zeroshot_accuracy(image, labels)
        if zeroshot is not None:
            metrics["val/zeroshot_acc"] = zeroshot
            metrics["val/zeroshot_chance"] = 1.0 / len(ZEROSHOT_CLASSES)
        if negative_wins.numel():
            metrics["val/negative_acc"] = float(negative_wins.float().mean())
        # every rank computed the same numbers from the same gathered data; sync_dist only averages equals
        for name, value in metrics.items():
            self.log(name, torch.tensor(value, device=self.device), sync_dist=True,
                     prog_bar=name in ("val/i2t_r1", "val/zeroshot_acc"))

    @torch.no_grad()
    def zeroshot_prompt_embeddings(self) -> Tensor:
        """[P, len(ZEROSHOT_CLASSES), E]: every template, and every size for templates with {size}."""
        embs = []
        for template in self.hparams.zeroshot_templates:
            for size in SIZES if "{size}" in template else [None]:
                prompts = [template.format(color=c, shape=s, size=size) for c, s in ZEROSHOT_CLASSES]
                embs.append(self.encode_text(self.tokenize(prompts))[1].float())
        return torch.stack(embs)

    def zeroshot_accuracy(self, image: Tensor, labels: Tensor) -> float | None:
        """Accuracy over images with a label >= 0; a class scores the cosine of its best-matching prompt."""
        keep = labels >= 0
        if not self.hparams.zeroshot_templates or not bool(keep.any()):
            return None
        scores = torch.einsum("ne,pce->pnc", image[keep], self.zeroshot_prompt_embeddings()).amax(0)  # [n, C]
        return float((scores.argmax(1) == labels[keep]).float().mean())

    # ---- checkpoints ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hp = self.hparams
        checkpoint["lit_diffusion"] = stage_block(
            "clip", tokenizer=self.tokenizer.to_json(),
            config={"vision": None if hp.vision is None else dict(hp.vision), "text": dict(hp.text),
                    "embed_dim": hp.embed_dim, "text_only": bool(hp.get("text_only", False))},
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # resuming: keep tokenizing exactly as the checkpoint did, even if tokenizer_path changed since
        saved = (checkpoint.get("lit_diffusion") or {}).get("tokenizer")
        if saved is None:
            return
        tokenizer = Tokenizer.from_json(saved)
        text = TextConfig(**self.hparams.text)
        for key, value in (("vocab_size", tokenizer.vocab_size), ("context_length", tokenizer.context_length),
                           ("eot_id", tokenizer.eot_id)):
            if getattr(text, key) != value:
                raise CheckpointError(f"the checkpoint's tokenizer has {key}={value}, the model config "
                                      f"{getattr(text, key)}: the checkpoint belongs to a different model")
        self.tokenizer = tokenizer


def _fill_from_tokenizer(text: TextConfig, tokenizer: Tokenizer, source: str) -> TextConfig:
    values = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
              "eot_id": tokenizer.eot_id}
    fields = asdict(text)
    for key, value in values.items():
        if fields[key] is None:
            fields[key] = value
        elif fields[key] != value:
            raise ValueError(f"model.init_args.text.{key} = {fields[key]} does not match the tokenizer "
                             f"({source}: {value}); leave it unset to take the tokenizer's")
    return TextConfig(**fields)
