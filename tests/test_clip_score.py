import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lit_diffusion.metrics.clip_score import CLIPScore, clip_embeddings, clip_score, clip_score_per_sample


class TinyCLIP(nn.Module):
    """Stand-in for the stage-1 CLIPModule: encode_image([-1, 1]) and encode_text -> (tokens, pooled)."""

    embed_dim = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(3 * 4, self.embed_dim)
        self.token_emb = nn.Embedding(20, self.embed_dim)
        self.image_ranges = []

    def encode_image(self, images):
        self.image_ranges.append((images.min().item(), images.max().item()))
        return F.normalize(self.image_proj(F.adaptive_avg_pool2d(images, 2).flatten(1)), dim=-1)

    def encode_text(self, tokens):
        token_features = self.token_emb(tokens)  # [B, L, E]
        return token_features, F.normalize(token_features.mean(1), dim=-1)


def embeddings(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)


def test_clip_score_equals_direct_formula_with_per_sample_clamp():
    img, txt = embeddings(50, 0)
    img[:3] = txt[:3] * 2.5  # cos = 1 -> 100
    img[3] = -txt[3]  # cos = -1 -> clamped to 0
    direct = [100 * max(F.cosine_similarity(i.double(), t.double(), dim=0).item(), 0.0) for i, t in zip(img, txt)]
    metric = CLIPScore()
    for a, b in zip(img.split(16), txt.split(16)):
        metric.update(a, b)
    assert metric.compute().item() == pytest.approx(sum(direct) / len(direct), rel=1e-10)
    per_sample = clip_score_per_sample(img, txt)
    assert per_sample[:3].tolist() == pytest.approx([100.0] * 3) and per_sample[3].item() == 0.0


def test_clip_score_matches_torchmetrics_update_logic():
    """torchmetrics' `_clip_score_update`, fed fake HF model/processor that return our embeddings."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    img, txt = embeddings(8, 1)
    txt = txt + 2 * img  # mostly positive cosines, where both definitions must agree per sample
    images = [torch.full((3, 4, 4), float(i)) for i in range(8)]  # sample index travels through the processor
    captions = [f"caption {i}" for i in range(8)]

    class Processor:
        def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
            if images is not None:
                return {"pixel_values": torch.stack([im[0, 0, 0].long() for im in images])}
            ids = torch.tensor([int(t.split()[1]) for t in text])
            return {"input_ids": ids, "attention_mask": torch.ones(len(text), 1)}

    class Model:
        config = SimpleNamespace()

        def to(self, device):
            return self

        def get_image_features(self, index):
            return img[index] * 3.0  # unnormalised, as HF returns them

        def get_text_features(self, index, mask):
            return txt[index]

    theirs, n = _clip_score_update(images, captions, Model(), Processor())
    assert n == 8 and (theirs > 0).all()
    torch.testing.assert_close(clip_score_per_sample(img, txt).float(), theirs.float(), rtol=1e-5, atol=1e-4)
    metric = CLIPScore()
    metric.update(img, txt)
    # torchmetrics.CLIPScore.compute: max(mean(score), 0)
    assert metric.compute().item() == pytest.approx(max(theirs.mean().item(), 0.0), rel=1e-5)


def test_clip_score_convenience_uses_clip_module_in_minus_one_one():
    clip = TinyCLIP()
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0
    tokens = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(3))
    value = clip_score(clip, images, tokens)
    assert clip.image_ranges[-1] == (-1.0, 1.0)
    with torch.no_grad():
        expected = clip_score_per_sample(clip.encode_image(images * 2 - 1), clip.encode_text(tokens)[1]).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    img_emb, txt_emb = clip_embeddings(clip, images, tokens)
    assert img_emb.shape == txt_emb.shape == (5, 6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_clip_score_errors():
    metric = CLIPScore()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="equal shape"):
        metric.update(torch.randn(4, 6), torch.randn(3, 6))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = embeddings(21, 4)
        results = {}
        for name, k in (("even", 10), ("uneven", 2)):
            metric = CLIPScore()
            part = slice(0, k) if rank == 0 else slice(k, None)
            metric.update(img[part], txt[part])
            results[name] = metric.compute()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_score_on_two_ranks_equals_one_rank(tmp_path):
    img, txt = embeddings(21, 4)
    single = CLIPScore()
    single.update(img, txt)
    expected = single.compute()
    # fork: the children inherit the imports (spawn would re-import torch and torchmetrics)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("even", "uneven"):
            torch.testing.assert_close(results[name], expected, rtol=1e-12, atol=0, msg=f"rank {rank} {name}")
