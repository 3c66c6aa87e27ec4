"""ClipLoss: the direct formula, and the distributed path (2 gloo processes) against one process on the whole batch."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lit_diffusion.models.clip_loss import ClipLoss
from lit_diffusion.stages.clip import gather_rows

WORLD, LOCAL, DIM = 2, 3, 8


def _pairs(seed: int, n: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def test_loss_matches_the_written_out_formula():
    image, text = _pairs(0, 5)
    scale = torch.tensor(10.0)
    # -1/2 [ mean_i log softmax_j(s <I_i, T_j>)_i + mean_i log softmax_j(s <T_i, I_j>)_i ]
    expected = 0.0
    for i in range(5):
        row = [scale * image[i] @ text[j] for j in range(5)]
        col = [scale * text[i] @ image[j] for j in range(5)]
        expected -= (row[i] - math.log(sum(math.exp(v) for v in row))) / 10
        expected -= (col[i] - math.log(sum(math.exp(v) for v in col))) / 10
    assert ClipLoss()(image, text, scale).item() == pytest.approx(float(expected), rel=1e-5)


def test_hard_negatives_join_the_image_to_text_softmax_only():
    image, text = _pairs(0, 4)
    negatives, _ = _pairs(1, 4)
    mask = torch.tensor([True, False, True, False])
    scale = torch.tensor(10.0)
    # image i's candidates: every caption, then every present negative (rows 0 and 2); captions only see images
    candidates = torch.cat([text, negatives[mask]])
    expected = 0.0
    for i in range(4):
        row = scale * candidates @ image[i]
        col = scale * image @ text[i]
        expected -= (row[i] - torch.logsumexp(row, 0)) / 8 + (col[i] - torch.logsumexp(col, 0)) / 8
    loss = ClipLoss()(image, text, scale, negatives, mask)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    assert loss.item() > ClipLoss()(image, text, scale).item()  # more candidates, lower probability
    with pytest.raises(ValueError, match="negatives and negative_mask together"):
        ClipLoss()(image, text, scale, negatives)


def test_several_negative_slots_a_row_are_all_candidates_of_every_image():
    image, text = _pairs(0, 4)
    negatives = torch.stack([_pairs(1, 4)[0], _pairs(2, 4)[0]], dim=1)  # [4, 2, E]: two kinds of swap a caption
    mask = torch.tensor([[True, False], [False, False], [True, True], [False, True]])
    scale = torch.tensor(10.0)
    candidates = torch.cat([text, negatives[mask]])  # every caption, then the 4 present negatives
    expected = 0.0
    for i in range(4):
        row = scale * candidates @ image[i]
        col = scale * image @ text[i]
        expected -= (row[i] - torch.logsumexp(row, 0)) / 8 + (col[i] - torch.logsumexp(col, 0)) / 8
    assert ClipLoss()(image, text, scale, negatives, mask).item() == pytest.approx(float(expected), rel=1e-5)


def test_perfectly_aligned_pairs_give_low_loss_and_shuffled_pairs_high():
    image, _ = _pairs(1, 16, dim=32)
    scale = torch.tensor(100.0)
    aligned = ClipLoss()(image, image.clone(), scale).item()
    shuffled = ClipLoss()(image, image.roll(1, 0), scale).item()
    assert aligned < 0.05 and shuffled > 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _negatives() -> tuple[torch.Tensor, torch.Tensor]:
    negatives, _ = _pairs(2, WORLD * LOCAL)
    return negatives, torch.arange(WORLD * LOCAL) % 2 == 0  # both ranks hold present and missing slots


def _worker(rank: int, port: int, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        image, text = _pairs(0, WORLD * LOCAL)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        out = {}
        for with_grad in (True, False):
            img = image[rows].clone().requires_grad_(True)
            txt = text[rows].clone().requires_grad_(True)
            scale = torch.tensor(7.0, requires_grad=True)
            loss = ClipLoss(rank, WORLD, gather_with_grad=with_grad)(img, txt, scale)
            loss.backward()
            out[with_grad] = (loss.detach(), img.grad, txt.grad, scale.grad)
        negatives, mask = _negatives()
        neg = negatives[rows].clone().requires_grad_(True)
        img = image[rows].clone().requires_grad_(True)
        loss = ClipLoss(rank, WORLD)(img, text[rows], torch.tensor(7.0), neg, mask[rows])
        loss.backward()
        out["negatives"] = (loss.detach(), img.grad, neg.grad)
        # uneven per-rank rows (as in validation) gather in rank order
        uneven = gather_rows(torch.full((rank + 1, 2), float(rank)))
        torch.save({"out": out, "uneven": uneven}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch afresh (seconds each)
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image, text = _pairs(0, WORLD * LOCAL)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(7.0, requires_grad=True)
    global_loss = ClipLoss()(image, text, scale)
    global_loss.backward()

    # each rank's loss is the mean over its own rows of the global-batch loss, so the ranks average to it
    losses = [results[r]["out"][True][0] for r in range(WORLD)]
    assert torch.stack(losses).mean().item() == pytest.approx(global_loss.item(), rel=1e-6)
    for r in range(WORLD):
        loss, g_img, g_txt, g_scale = results[r]["out"][True]
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        # DDP averages parameter gradients over ranks; the gather's backward sums every rank's contribution
        # into these rows, so (rank gradient / world size) is the global loss's gradient
        torch.testing.assert_close(g_img / WORLD, image.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_txt / WORLD, text.grad[rows], rtol=1e-5, atol=1e-6)
    # the logit scale is replicated: its rank gradients average to the global one
    scale_grads = torch.stack([results[r]["out"][True][3] for r in range(WORLD)])
    assert scale_grads.mean().item() == pytest.approx(scale.grad.item(), rel=1e-5)

    # without gradient through the gather the losses are the same but the cross-rank gradient terms are lost
    for r in range(WORLD):
        assert results[r]["out"][False][0].item() == pytest.approx(losses[r].item(), rel=1e-6)
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        assert not torch.allclose(results[r]["out"][False][1] / WORLD, image.grad[rows], atol=1e-6)

    # hard negatives: gathered from every rank like the captions, so every image sees all of them
    negatives, mask = _negatives()
    image, negatives = image.detach().requires_grad_(True), negatives.requires_grad_(True)
    global_loss = ClipLoss()(image, text.detach(), torch.tensor(7.0), negatives, mask)
    global_loss.backward()
    losses = [results[r]["out"]["negatives"][0] for r in range(WORLD)]
    assert torch.stack(losses).mean().item() == pytest.approx(global_loss.item(), rel=1e-6)
    for r in range(WORLD):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        _, g_img, g_neg = results[r]["out"]["negatives"]
        torch.testing.assert_close(g_img / WORLD, image.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_neg / WORLD, negatives.grad[rows], rtol=1e-5, atol=1e-6)
    assert negatives.grad[~mask].abs().max() == 0  # a missing slot takes no part

    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["uneven"], expected)


CAPTIONS = [["a red circle left of a blue square", "a large green triangle", "a yellow square above a red circle"],
            ["a small red circle", "a large blue square", "a green triangle"]]  # rank 1: no swap word
# a word-swap slot and a colour-binding slot a caption: rank 0 fills some of both, rank 1 none
NEGATIVES = dict(hard_negatives={"left": "right", "above": "below"},
                 binding_negatives={"color": ["red", "blue", "green", "yellow"]})


def _clip_worker(rank: int, port: int, tokenizer: str, out_dir):
    from datetime import timedelta

    from conftest import TINY_CLIP

    from lit_diffusion.stages.clip import CLIPModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))  # a missing backward collective fails, not hangs
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        clip = CLIPModule(tokenizer_path=tokenizer, **NEGATIVES, **TINY_CLIP)
        images = torch.rand(WORLD * LOCAL, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
        batch = {"image": images[rank * LOCAL:(rank + 1) * LOCAL], "caption": CAPTIONS[rank]}
        loss = clip.model_step(batch, ClipLoss(rank, WORLD, gather_with_grad=True))[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
        for g in grads.values():
            dist.all_reduce(g)
            g /= WORLD  # DDP's average
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/clip{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_rank_whose_captions_have_no_swap_word_trains_in_step_with_the_others(shapes_data, tmp_path):
    """Hard negatives are gathered with their gradients: a rank with no swap word in its batch (zero negatives)
    must still run that gather's backward, or the others wait for it forever. The averaged gradients equal one
    process's on the global batch."""
    from conftest import TINY_CLIP

    from lit_diffusion.stages.clip import CLIPModule

    tokenizer = str(shapes_data / "tokenizer.json")
    mp.start_processes(_clip_worker, args=(_free_port(), tokenizer, str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"clip{r}.pt") for r in range(WORLD)]
    torch.manual_seed(0)
    clip = CLIPModule(tokenizer_path=tokenizer, **NEGATIVES, **TINY_CLIP)
    images = torch.rand(WORLD * LOCAL, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loss = clip.model_step({"image": images, "caption": CAPTIONS[0] + CAPTIONS[1]}, ClipLoss())[0]
    loss.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in clip.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
