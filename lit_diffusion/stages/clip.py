"""Stage 1: CLIP, trained contrastively on image-caption pairs; its text encoder later conditions the diffusion U-Net.

With a video tower (`vision.frames` > 1, see `models.clip`) it trains on clip-caption pairs: a batch's "video"
[B, T, 3, H, W] (VideoDataModule) is read when present, else its "image"; everything below is the same for both.
With motion words as hard negatives ({left: right, up: down}) `val/negative_acc` is the motion accuracy: how often
a clip scores its caption above the one moving the other way, which no single frame can tell.

Validation embeds the whole val set, gathers it from every rank (uneven per-rank counts are fine) and reports:
- retrieval recall@1/@5 in both directions (`val/i2t_r*`: image -> caption, `val/t2i_r*`: caption -> image).
  Captions repeat (the shapes data has only a few hundred distinct captions), so an exact-index match would be
  ambiguous: a retrieval counts as correct when the retrieved item's caption string equals the query's caption.
  `val/r1_chance` / `val/r5_chance` are what a random ranking scores under that rule (same in both directions).
- zero-shot accuracy (`val/zeroshot_acc`), open_clip style: the data's class names and prompt templates come in
  through `zeroshot` (the config, or a JSON file such as the shapes writer's info.json); a class scores the cosine of
  its best-matching prompt. A val sample's class is its KEY.json `label` (a class name), else the one class name
  its caption holds (none or several: the sample is left out). On the shapes data the classes are colour x shape,
  so only single-object images count, and the templates name the size too ("a small {}", "a large {}"): every
  training caption names one, and a size-less "a {color} {shape}" is out of distribution for the text encoder
  (measured on shapes after 400 steps: 0.36 accuracy without the size, 0.34 averaging the two sizes' embeddings
  CLIP-style, 0.86 with the max over prompts).
- with `hard_negatives` (word swaps such as above <-> below): `val/negative_acc`, the fraction of val captions
  holding a swap word whose image scores its true caption above the swapped one (0.5: the swap goes unnoticed).
- with `binding_negatives` ({color: [red, ...], shape: [...]}): `val/binding_acc_<group>`, the same for captions
  whose two objects' attributes of the group are exchanged ("a red circle and a blue square" -> "a blue circle and
  a red square"): does the caption embedding know which object has which colour.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.utilities.distributed import gather_all_tensors

from lit_diffusion.data.negatives import BindingSwaps, WordSwaps
from lit_diffusion.data.tokenizer import Tokenizer
from lit_diffusion.models.clip import CLIP, TextConfig, VisionConfig, inflate_image_weights
from lit_diffusion.models.clip_loss import ClipLoss
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.stages.base import CheckpointError, Stage, load_stage_checkpoint, stage_block
from lit_diffusion.stages.common import adamw_with_warmup

# ---------------------------------------------------------------------------------------------- metric helpers
def caption_ids(captions: Sequence[str]) -> Tensor:
    """Stable 63-bit hashes of caption strings [B], so equal captions can be compared across ranks as tensors."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little") >> 1
                         for c in captions], dtype=torch.long)


def zeroshot_spec(zeroshot: dict | str | Path | None, option: str = "model.init_args.zeroshot") -> dict | None:
    """{"classes": [names], "templates": [prompts with {}]} from a dict, or from the `zeroshot` block of a JSON
    file (the shapes writer's info.json); None switches val/zeroshot_acc off. Bad input names the option/file."""
    if zeroshot is None:
        return None
    if isinstance(zeroshot, (str, Path)):
        path = Path(zeroshot)
        try:
            zeroshot = json.loads(path.read_text()).get("zeroshot")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"{option}: cannot read a JSON object from {path} ({err})") from err
        if zeroshot is None:
            raise ValueError(f"{option}: {path} has no `zeroshot` block ({{classes: [...], templates: [...]}})")
        option = f"{option} ({path})"
    if not isinstance(zeroshot, dict) or set(zeroshot) != {"classes", "templates"}:
        raise ValueError(f"{option} must be {{classes: [names], templates: [prompts with {{}}]}} or a JSON file "
                         f"holding one, got {zeroshot!r}")
    classes, templates = list(zeroshot["classes"] or []), list(zeroshot["templates"] or [])
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes) or len(set(classes)) < len(classes):
        raise ValueError(f"{option}.classes must be distinct non-empty names, got {classes!r}")
    for t in templates or [None]:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"{option}.templates: {t!r} needs a {{}} where the class name goes")
    return {"classes": [str(c) for c in classes], "templates": [str(t) for t in templates]}


class ZeroshotLabeler:
    """A val sample's class index: its KEY.json `label` (a class name), else the one class named in its caption
    (whole words, any case); -1 when it names none or several."""

    def __init__(self, classes: Sequence[str]):
        self.index = {c: i for i, c in enumerate(classes)}
        self.patterns = [re.compile(rf"(?<!\w){re.escape(c.lower())}(?!\w)") for c in classes]

    def __call__(self, attrs: dict | None, caption: str) -> int:
        label = attrs.get("label") if isinstance(attrs, dict) else None
        if label is not None:
            return self.index.get(str(label), -1)
        text = caption.lower()
        found = [i for i, p in enumerate(self.patterns) if p.search(text)]
        return found[0] if len(found) == 1 else -1


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
class CLIPModule(Stage):
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
        zeroshot: dict | str | None = None,
        gather_with_grad: bool = True,
        tokenizer_json: str | None = None,
        hard_negatives: dict[str, str] | None = None,
        binding_negatives: dict[str, list[str]] | None = None,
        text_only: bool = False,
        init_from: str | None = None,
    ):
        """CLIP training stage.

        vision / text: `VisionConfig` / `TextConfig` fields (plain dicts accepted; checkpoints store dicts). The
            text vocabulary size, context length and end-of-text id come from the tokenizer. `vision.frames` > 1
            (with `vision.tubelet`): a video tower, which trains on the batches' "video" clips.
        tokenizer_path: tokenizer.json (`lit-diffusion data shapes` writes one); its JSON travels in every
            checkpoint, so the file is not needed to load one.
        weight_decay: AdamW decay on matrices only (not biases, norms, class token or logit scale).
        zeroshot: {classes: [names], templates: [prompts with {}]} for val/zeroshot_acc, or a JSON file with
            such a `zeroshot` block (the shapes writer's info.json); None switches it off.
        gather_with_grad: contrast against the global batch with gradients through the all-gather (open_clip).
        tokenizer_json: the tokenizer itself instead of a path (used by `from_checkpoint`; not saved in hparams).
        hard_negatives: word pairs, e.g. {above: below, left: right}: every caption holding one of the words also
            yields a false caption with the words swapped, a negative for its image (NegCLIP; see `ClipLoss`).
            Without them CLIP reads captions as bags of words and the diffusion model it conditions cannot tell
            "A above B" from "A below B".
        binding_negatives: attribute groups, e.g. {color: [red, blue, ...], shape: [circle, square]}: every caption
            with two different words of a group also yields a false caption with the two exchanged (which object
            has which colour), one more negative for its image per group (NegCLIP's attribute swaps; `BindingSwaps`).
        text_only: no image tower (`vision` ignored): a text encoder imported alone conditions a diffusion model.
        init_from: a CLIP stage checkpoint (trained, or written by `lit-diffusion import clip`) to fine-tune: its
            architecture, tokenizer and weights replace vision / text / embed_dim / tokenizer_path. Not a
            hyper-parameter: this module's own checkpoints hold those weights, and rebuilding one needs no file.
            An image CLIP with `vision: {frames: T, tubelet: t}` given here starts a video CLIP: its patch
            embedding inflated over the tubelet and its temporal positions zero (`models.clip.inflate_image_weights`),
            so a still clip's tubelets embed as its image's patches.
        """
        super().__init__()
        init, inflate = None, False
        if init_from:
            init = load_stage_checkpoint(init_from, "clip")
            config = init["lit_diffusion"].get("config") or {}
            asked = asdict(vision) if isinstance(vision, VisionConfig) else dict(vision or {})
            vision, text = config.get("vision"), config.get("text")
            # an image CLIP started as a video CLIP: `vision.frames` (and `tubelet`) given here inflate its tower
            inflate = bool(vision) and int(vision.get("frames", 1)) == 1 and int(asked.get("frames", 1)) > 1
            if inflate:
                vision = {**vision, "frames": int(asked["frames"]), "tubelet": int(asked.get("tubelet", 1))}
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
        zeroshot = zeroshot_spec(zeroshot)
        self.zeroshot_labeler = ZeroshotLabeler(zeroshot["classes"]) if zeroshot else None
        hard_negatives = dict(hard_negatives or {})
        # checked here, so a bad pair fails at startup naming the option
        self.word_swaps = WordSwaps(hard_negatives, "model.init_args.hard_negatives") if hard_negatives else None
        binding_negatives = {str(k): [str(w) for w in v] for k, v in (binding_negatives or {}).items()}
        if "words" in binding_negatives:  # the word swap's slot: its figure is val/negative_acc
            raise ValueError("model.init_args.binding_negatives: 'words' names the hard_negatives slot; call the "
                             "group something else")
        self.binding_swaps = (BindingSwaps(binding_negatives, "model.init_args.binding_negatives")
                              if binding_negatives else None)
        # the negative slots of every caption, in order: the word swap, then one per binding group
        self.negative_kinds = (["words"] if self.word_swaps else []) + (self.binding_swaps.names
                                                                        if self.binding_swaps else [])
        # plain python only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "vision": None if vision is None else asdict(vision), "text": asdict(text), "embed_dim": int(embed_dim),
            "tokenizer_path": None if tokenizer_path is None else str(tokenizer_path), "lr": lr,
            "weight_decay": weight_decay, "betas": [float(b) for b in betas], "warmup_steps": warmup_steps,
            "zeroshot": zeroshot, "gather_with_grad": gather_with_grad,
            "hard_negatives": {str(k): str(v) for k, v in hard_negatives.items()},
            "binding_negatives": binding_negatives,
        })
        self.hparams["text_only"] = bool(text_only)
        self.tokenizer = tokenizer
        self.model = CLIP(vision, text, embed_dim)
        self.embed_dim, self.text_width = int(embed_dim), text.width
        self.image_size = None if vision is None else vision.image_size
        self.frames = None if vision is None else vision.frames  # 1: an image tower
        self.train_loss_fn = ClipLoss()  # replaced in setup() with this rank's place in the world
        self.local_loss_fn = ClipLoss()  # validation: rank-local (ranks may see different numbers of batches)
        self.val_loss = MeanMetric()
        self._val: dict[str, list[Tensor]] = {}
        if init is not None:  # every weight, or an error naming what does not match
            state = init.get("state_dict") or {}
            if inflate:
                state = inflate_image_weights(state, vision, prefix="model.visual.")
            missing, unexpected = self.load_state_dict(state, strict=False)
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

    @torch.no_grad()
    def caption_conditions(self, captions: Sequence[str]) -> Conditioning:
        """Captions as a denoiser or the prior is conditioned on them: token features [B, L, W], the mask of real
        tokens [B, L] and the pooled embedding [B, E] (L2-normalised)."""
        tokens = self.tokenize(captions)
        features, pooled = self.encode_text(tokens)
        return Conditioning(context=features, mask=self.tokenizer.mask(tokens), pooled=pooled)

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] or clips [B, T, 3, H, W] in [-1, 1] -> [B, E] L2-normalised. Images of another size
        are centre-cropped to a square and resized to the tower's (antialiased bicubic, CLIP's preprocessing): a
        256 px diffusion model's samples meet a 224 px CLIP in FID-with-CLIP-features and CLIP score. A video tower
        embeds an image as a still clip; an image tower refuses clips of more than one frame."""
        size = self.image_size
        if size is None:
            return self.model.encode_image(images)  # raises: no image tower
        if images.shape[-2:] != (size, size):
            h, w = images.shape[-2:]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            frames = images[..., top:top + side, left:left + side].float().flatten(0, -4)  # [B (* T), 3, s, s]
            resized = F.interpolate(frames, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            images = resized.clamp(-1, 1).reshape(*images.shape[:-2], size, size)
        return self.model.encode_image(images.to(self.device, self.model.visual.conv1.weight.dtype))

    @classmethod
    def init_args_from_checkpoint(cls, ckpt: dict, source: str) -> dict:
        """The saved config and the tokenizer itself: the checkpoint does not need the tokenizer file."""
        block = ckpt["lit_diffusion"]
        if "tokenizer" not in block:
            raise CheckpointError(f"{source}: the CLIP checkpoint holds no tokenizer")
        hparams = {**(ckpt.get("hyper_parameters") or {}), **(block.get("config") or {})}
        return {**cls.accepted_args(hparams), "tokenizer_json": block["tokenizer"], "tokenizer_path": None}

    # ---- training ----
    def setup(self, stage: str) -> None:
        self.train_loss_fn = ClipLoss(self.global_rank, self.trainer.world_size, self.hparams.gather_with_grad)

    def _text_tokens(self, captions: Sequence[str]) -> Tensor:
        tokens = self.tokenize(captions)
        # drop the all-padding tail: attention is causal, so the pooled end-of-text features do not change,
        # and short captions in a long context would otherwise spend most of the text compute on padding
        return tokens[:, : int(self.tokenizer.mask(tokens).sum(1).max())]

    def negative_captions(self, caption: str) -> list[str | None]:
        """The caption's false twins, one per `negative_kinds` slot (None: it has nothing to swap there, or the twin
        is an earlier slot's: "A moving left and B moving right" swapped left/right or by direction is one twin)."""
        out = [self.word_swaps(caption)] if self.word_swaps else []
        if self.binding_swaps:
            out += list(self.binding_swaps(caption).values())
        return [None if twin in out[:i] else twin for i, twin in enumerate(out)]

    def negative_embeddings(self, captions: Sequence[str]) -> tuple[Tensor, Tensor] | None:
        """(embeddings [B, K, E] of the false captions, zero where a caption has none of that kind; mask [B, K]
        bool), K = len(negative_kinds); None without `hard_negatives` or `binding_negatives`."""
        if not self.negative_kinds:
            return None
        swapped = [s for c in captions for s in self.negative_captions(c)]  # [B * K], caption-major
        mask = torch.tensor([s is not None for s in swapped], device=self.device)
        negatives = torch.zeros(len(swapped), self.embed_dim, device=self.device)
        if bool(mask.any()):
            _, embedded = self.model.encode_text(self._text_tokens([s for s in swapped if s is not None]))
            negatives = negatives.to(embedded.dtype).index_copy(0, mask.nonzero()[:, 0], embedded)
        k = len(self.negative_kinds)
        return negatives.view(len(captions), k, self.embed_dim), mask.view(len(captions), k)

    def model_step(self, batch: dict, loss_fn: ClipLoss) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple | None]:
        """-> (loss, image embeddings [B, E], text embeddings [B, E], logit scale, hard negatives or None).

        The pixels are the batch's "video" [B, T, 3, H, W] when it has one (VideoDataModule), else its "image"."""
        pixels = batch["video"] if "video" in batch else batch["image"]
        image, text, scale = self.model(pixels, self._text_tokens(batch["caption"]))
        negatives = self.negative_embeddings(batch["caption"])
        if negatives is not None and text.requires_grad and not negatives[0].requires_grad:
            # no swap word in this rank's batch: its zero negatives still join the graph, so the gather of the
            # negatives (gather_with_grad) runs its backward collective here as on the ranks that have some; it
            # would otherwise wait there for this rank forever
            negatives = (negatives[0] + 0.0 * text[:1].sum(), negatives[1])
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
        self.val_loss.update(loss, weight=b)  # logged at the epoch's end, on every rank (a rank may have no batch)
        attrs = batch.get("attrs") or [{}] * b
        self._val["image"].append(image.float())
        self._val["text"].append(text.float())
        self._val["ids"].append(caption_ids(batch["caption"]).to(self.device))
        if self.zeroshot_labeler is not None:
            labels = [self.zeroshot_labeler(a, c) for a, c in zip(attrs, batch["caption"])]
            self._val["zeroshot"].append(torch.tensor(labels, dtype=torch.long, device=self.device))
        if negatives is not None:
            embedded, mask = negatives
            wins = (image * text).sum(1, keepdim=True) > (image[:, None] * embedded.to(image.dtype)).sum(2)  # [B, K]
            self._val["negative_win"].append(wins.float().masked_fill(~mask, -1.0))  # -1: no negative of that kind

    def _gathered(self, name: str, width: int | None) -> Tensor:
        parts = self._val.get(name) or []
        if parts:
            local = torch.cat(parts)
        else:  # this rank saw no val batch: still take part in the gather
            local = torch.empty((0, width) if width else (0,), device=self.device,
                                dtype=torch.float32 if width else torch.long)
        return gather_rows(local)

    def on_validation_epoch_end(self) -> None:
        # computed on every rank, not logged as a metric object per step: Lightning would all-reduce it only on the
        # ranks that logged it, and a rank without val batches would leave the others waiting
        self.log("val/loss", self.val_loss.compute().float(), prog_bar=True, rank_zero_only=False)
        self.val_loss.reset()
        image = self._gathered("image", self.embed_dim)  # [N, E], every rank's samples
        text = self._gathered("text", self.embed_dim)
        ids = self._gathered("ids", None)
        labels = self._gathered("zeroshot", None)
        kinds = self.negative_kinds
        negative_wins = self._gathered("negative_win", len(kinds)) if kinds else None  # [N, K]
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
            metrics["val/zeroshot_chance"] = 1.0 / len(self.hparams.zeroshot["classes"])
        for kind, wins in zip(kinds, negative_wins.T if kinds else ()):
            wins = wins[wins >= 0]
            if wins.numel():
                metrics["val/negative_acc" if kind == "words" else f"val/binding_acc_{kind}"] = float(wins.mean())
        # every rank computed the same numbers from the same gathered data; sync_dist only averages equals
        for name, value in metrics.items():
            self.log(name, torch.tensor(value, device=self.device), sync_dist=True,
                     prog_bar=name in ("val/i2t_r1", "val/zeroshot_acc"))

    @torch.no_grad()
    def zeroshot_prompt_embeddings(self) -> Tensor:
        """[P, C, E]: every template filled with every class name."""
        classes, templates = self.hparams.zeroshot["classes"], self.hparams.zeroshot["templates"]
        return torch.stack([self.encode_text(self.tokenize([t.format(c) for c in classes]))[1].float()
                            for t in templates])

    def zeroshot_accuracy(self, image: Tensor, labels: Tensor) -> float | None:
        """Accuracy over images [N, E] with a label >= 0; a class scores the cosine of its best-matching prompt."""
        keep = labels >= 0
        if not self.hparams.zeroshot or not bool(keep.any()):
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
