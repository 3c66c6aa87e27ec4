"""Rank images by a text query with a trained CLIP, including embedding arithmetic.

Query syntax: a base caption, then optional terms starting with "+" or "-" after a space:
    "a large red circle +blue -red"   ->   normalize(e("a large red circle") + e("blue") - e("red"))
where e() is CLIP's L2-normalised text embedding; a term runs until the next " +" / " -" (so "+a blue square"
is one term). Images are preprocessed like the training data (shorter side resized, centre crop).
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from lit_diffusion.data.shards import decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_TERM = re.compile(r"\s+(?=[+-]\S)")


def parse_query(text: str) -> tuple[str, list[tuple[float, str]]]:
    """"a red circle +blue -red" -> ("a red circle", [(1.0, "blue"), (-1.0, "red")])."""
    base, *terms = _TERM.split(text.strip())
    if not base:
        raise ValueError("empty query")
    if base[0] in "+-" and len(base) > 1 and not base[1].isspace():
        raise ValueError(f"query {text!r} starts with a +/- term; write the base caption first")
    parsed = []
    for term in terms:
        parsed.append((1.0 if term[0] == "+" else -1.0, term[1:].strip()))
    return base.strip(), parsed


@torch.no_grad()
def text_query_embedding(clip, text: str) -> torch.Tensor:
    """[E] L2-normalised: the base caption's embedding plus/minus the terms' embeddings, renormalised."""
    base, terms = parse_query(text)
    emb = clip.encode_text(clip.tokenize([base, *[t for _, t in terms]]))[1].float().cpu()  # [1 + T, E]
    signs = torch.tensor([1.0] + [s for s, _ in terms])  # [1 + T]
    return F.normalize((signs[:, None] * emb).sum(0), dim=-1)


def list_images(images: str | Path | Sequence[str | Path]) -> list[str]:
    """A directory (its image files, sorted), one file or URL, or a list of files/URLs."""
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in directory {path}")
            return found
        images = [images]
    shards = [str(i) for i in images if str(i).lower().endswith(".tar")]
    if shards:
        raise ValueError(f"{shards[0]} is a shard: clip query ranks image files, a folder of them or image URLs")
    return [str(i) for i in images]


def _read(source: str) -> bytes:
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(source, timeout=30) as response:
            return response.read()
    try:
        return Path(source).read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"cannot read image {source!r}: {err}") from err


@torch.no_grad()
def query(ckpt, images: str | Path | Sequence[str | Path], text: str, top_k: int = 5,
          batch_size: int = 64) -> list[tuple[str, float]]:
    """The `top_k` images most similar to `text`, best first, as (path or URL, cosine similarity).

    ckpt: a CLIP stage checkpoint path, or an already loaded CLIPModule."""
    if isinstance(ckpt, (str, Path)):
        from lit_diffusion.stages.clip import CLIPModule

        clip = CLIPModule.from_checkpoint(ckpt)
    else:
        clip = ckpt
    sources = list_images(images)
    q = text_query_embedding(clip, text)  # [E]
    scores = []
    for start in range(0, len(sources), batch_size):
        batch = []
        for src in sources[start:start + batch_size]:
            try:
                batch.append(decode_image(_read(src), clip.image_size))  # uint8 [3, S, S]
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot decode image {src!r}: {err}") from err
        x = torch.stack(batch).float() / 127.5 - 1  # [b, 3, S, S] in [-1, 1]
        scores.append(clip.encode_image(x).float().cpu() @ q)  # [b]
    scores = torch.cat(scores)
    order = scores.argsort(descending=True)[:top_k]
    return [(sources[i], float(scores[i])) for i in order.tolist()]
