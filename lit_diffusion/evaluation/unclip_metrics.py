"""What unCLIP adds to a text-to-image model, measured: how diverse one caption's images are, and how faithful an
image's variations are to it (DALL-E 2 sec. 3 and 5.1: the prior's main gain over a text-conditioned decoder is
diversity at the same fidelity; variations keep an image's content and style while varying its details).

Distances are between CLIP image embeddings, L2-normalised: ||e_i - e_j|| = sqrt(2 - 2 cos(e_i, e_j)), 0 for images
CLIP sees alike, sqrt(2) for orthogonal ones, 2 at most. It orders pairs as 1 - cos does, but is a metric (the
triangle inequality holds), so a mean of distances is the mean spread of the embeddings in CLIP's space.
Images are quantised to uint8 first, as the evaluator does, so the figures are those of the images as saved.

Both functions run on one process (the pipeline's final evaluation, a notebook): nothing is reduced across ranks.
Standard errors are over the independent units, the captions or the source images, not over the samples of one
caption or the variations of one image, which share their caption or source.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_diffusion.evaluation.evaluator import sample_seed
from lit_diffusion.metrics.caption_accuracy import ATTRIBUTES, check_image
from lit_diffusion.metrics.features import to_uint8

# generate(captions, seeds) -> images [N, 3, H, W] in [0, 1], one per caption
Generate = Callable[[list[str], list[int]], Tensor]
# make_variations(images [N, 3, H, W] in [0, 1], per_image, seed) -> [N * per_image, 3, H, W], image-major
MakeVariations = Callable[[Tensor, int, int], Tensor]
JUDGED = (*ATTRIBUTES, "correct")  # the judge's per-image booleans that are reported


def _embed(clip_module, images: Tensor) -> Tensor:
    """images [N, 3, H, W] in [0, 1] -> unit CLIP image embeddings [N, E] (float64), of the uint8-quantised
    images."""
    images = to_uint8(images).float() / 255
    return F.normalize(clip_module.encode_image(images * 2 - 1).double(), dim=-1)


def mean_pairwise_distance(embeddings: Tensor) -> float:
    """Mean ||e_i - e_j|| over the unordered pairs i < j of embeddings [n, E] (n >= 2)."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"a mean pairwise distance needs at least 2 embeddings, got {n}")
    i, j = torch.triu_indices(n, n, offset=1)
    return float((embeddings[i] - embeddings[j]).norm(dim=-1).mean())


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); the error is nan for fewer than 2 values."""
    x = torch.tensor(list(values), dtype=torch.float64)
    if len(x) == 0:
        return math.nan, math.nan
    se = float(x.std() / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def _seeds(name: str, n: int, seed: int) -> list[int]:
    return [sample_seed(f"{name}#{j}", seed) for j in range(n)]


@torch.no_grad()
def within_caption_diversity(generate: Generate, captions: Sequence[str], clip_module, per_caption: int = 8,
                             seed: int = 0) -> dict:
    """The mean pairwise CLIP distance between `per_caption` images of one caption, averaged over `captions`.

    `generate(captions, seeds)` makes one image [3, H, W] in [0, 1] per caption; it is called once per caption, with
    the caption repeated and seeds keyed by the caption's text and the sample's index (`sample_seed`), so a caption
    gets the same images whatever list it is in. Returns {"diversity": mean over captions, "diversity_se": its
    standard error over captions, "captions": how many}."""
    if per_caption < 2:
        raise ValueError(f"per_caption must be >= 2 (pairs of one caption's images), got {per_caption}")
    per = []
    for caption in captions:
        images = generate([caption] * per_caption, _seeds(caption, per_caption, seed))
        if images.shape[0] != per_caption:
            raise ValueError(f"generate returned {images.shape[0]} images for {per_caption} captions")
        per.append(mean_pairwise_distance(_embed(clip_module, images)))
    diversity, se = _mean_se(per)
    return {"diversity": diversity, "diversity_se": se, "captions": len(per)}


@torch.no_grad()
def variation_metrics(make_variations: MakeVariations, images: Tensor, attrs: Sequence[dict | None], clip_module,
                      judge: Callable[[Tensor, dict], dict] = check_image, per_image: int = 4, seed: int = 0) -> dict:
    """How faithful `per_image` variations of each source image are to it.

    `make_variations(images, per_image, seed)` returns [N * per_image, 3, H, W] in [0, 1], image-major (source 0's
    variations first). For each variation: the shapes judge (`judge(image, attrs)`, per-attribute booleans, by
    default caption accuracy's `check_image`) against the SOURCE's attrs, and its CLIP cosine similarity to the
    source; for each source, the spread of its variations (their mean pairwise CLIP distance, as diversity).
    Sources whose attrs are None or hold no shapes objects are not judged. The judge's figures on the sources
    themselves (`source_acc_*`) are the ceiling: what a variation identical to its source scores.

    Returns, each with `_se` (the standard error over sources, of each source's mean over its variations):
    `similarity`, `spread` (per_image >= 2), `acc_{attr}` for attr in count, colors, shapes, sizes, relation,
    correct (DALL-E 2-style faithfulness: "variations keep colour and shape" reads acc_colors and acc_shapes), and
    `source_acc_{attr}` (no error: one image per source); and the counts `sources`, `variations`, `judged`."""
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    n = images.shape[0]
    if len(attrs) != n:
        raise ValueError(f"{n} images but {len(attrs)} attrs")
    variations = make_variations(images, per_image, seed)
    if variations.shape[0] != n * per_image:
        raise ValueError(f"make_variations returned {variations.shape[0]} images for {n} sources x {per_image}")
    source_emb = _embed(clip_module, images)  # [N, E]
    var_emb = _embed(clip_module, variations).reshape(n, per_image, -1)  # [N, P, E]
    similarity = (var_emb * source_emb[:, None]).sum(-1)  # [N, P] cosines
    out: dict = {}
    out["similarity"], out["similarity_se"] = _mean_se(similarity.mean(1).tolist())
    if per_image >= 2:
        out["spread"], out["spread_se"] = _mean_se([mean_pairwise_distance(e) for e in var_emb])

    judged = [i for i, a in enumerate(attrs) if a and a.get("objects")]
    quantised = to_uint8(variations).float().cpu() / 255
    sources = to_uint8(images).float().cpu() / 255
    per_source = {k: [] for k in JUDGED}
    on_sources = {k: [] for k in JUDGED}
    for i in judged:
        checks = [judge(quantised[i * per_image + k], attrs[i]) for k in range(per_image)]
        own = judge(sources[i], attrs[i])
        for key in JUDGED:
            per_source[key].append(sum(float(c[key]) for c in checks) / per_image)
            on_sources[key].append(float(own[key]))
    for key in JUDGED:
        out[f"acc_{key}"], out[f"acc_{key}_se"] = _mean_se(per_source[key])
        out[f"source_acc_{key}"] = _mean_se(on_sources[key])[0]
    out |= {"sources": n, "variations": n * per_image, "judged": len(judged)}
    return out


def cached(generate: Generate) -> Generate:
    """`generate` remembering its images by (captions, seeds), so that two metrics of the same captions and seeds
    (CLIP diversity and position spread) sample once."""
    memo: dict[tuple, Tensor] = {}

    def remembered(captions: list[str], seeds: list[int]) -> Tensor:
        key = (tuple(captions), tuple(seeds))
        if key not in memo:
            memo[key] = generate(captions, seeds)
        return memo[key]

    return remembered


# ------------------------------------------------------------------------------------ unCLIP's two generators
def unclip_generate(decoder, prior=None, **sample_kwargs) -> Generate:
    """`generate` for `within_caption_diversity`: caption -> prior -> decoder with the same per-sample seed for both
    (unCLIP), or a text-only model's own `sample` (prior None). `sample_kwargs` go to the decoder's `sample`."""
    if getattr(decoder, "image_conditioned", False) and prior is None:
        raise ValueError("unCLIP's decoder needs a prior to generate from captions")

    def generate(captions: list[str], seeds: list[int]) -> Tensor:
        extra = {"image_embeddings": prior.sample(captions, seed=seeds)} if prior is not None else {}
        return decoder.sample(captions, seed=seeds, **sample_kwargs, **extra)

    return generate


def decoder_variations(decoder, prompt: str = "", **sample_kwargs) -> MakeVariations:
    """`make_variations` for `variation_metrics`: unCLIP's decoder conditioned on each source's CLIP image
    embedding (and the caption `prompt`, the empty one by default), per_image seeds per source (DALL-E 2 sec. 3.1)."""
    if not getattr(decoder, "image_conditioned", False):
        raise ValueError("variations need unCLIP's decoder (condition: text+image_embedding or image_embedding)")

    def make_variations(images: Tensor, per_image: int, seed: int) -> Tensor:
        emb = decoder.encode_image_embeddings(images).repeat_interleave(per_image, dim=0)  # [N * P, E], image-major
        seeds = [s for i in range(images.shape[0]) for s in _seeds(f"variation {i}", per_image, seed)]
        return decoder.sample([prompt] * emb.shape[0], seed=seeds, image_embeddings=emb, **sample_kwargs)

    return make_variations
