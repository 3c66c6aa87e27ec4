"""CLIP networks and stage: masks, eot pooling, causality, logit-scale clamp, retrieval metrics, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import retry_on_gloo_teardown_abort

from lit_diffusion.data.negatives import BindingSwaps, WordSwaps, swap_table
from lit_diffusion.data.tokenizer import Tokenizer
from lit_diffusion.models.clip import CLIP, MAX_LOGIT_SCALE, TextConfig, VisionConfig
from lit_diffusion.models.transformer import Transformer
from lit_diffusion.stages.clip import (
    CLIPModule,
    caption_ids,
    recall_chance,
    retrieval_recall,
)
from lit_diffusion.stages.base import CheckpointError, stage_block

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle above a large red square",
            "a large yellow circle left of a small cyan triangle"]
TINY = dict(vision=dict(image_size=16, patch_size=4, width=32, layers=2, heads=2),
            text=dict(width=32, layers=2, heads=2), embed_dim=16)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(CAPTIONS * 3, vocab_size=200, context_length=16).save(path)
    return path


@pytest.fixture
def module(tokenizer_file):
    torch.manual_seed(0)
    return CLIPModule(tokenizer_path=str(tokenizer_file), **TINY).eval()


# ---- transformer ----
def test_fused_self_attention_matches_torch_multihead_with_causal_and_padding_masks():
    torch.manual_seed(0)
    attn = Transformer(width=8, layers=1, heads=2).blocks[0].attn.double().eval()
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    with torch.no_grad():  # CLIP's qkv is MultiheadAttention's in_proj: q, k, v stacked
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(torch.randn(24))
        attn.qkv.bias.copy_(ref.in_proj_bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(torch.randn(8))
        attn.proj.bias.copy_(ref.out_proj.bias)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)  # torch's convention: True = hidden
    for causal, attn_mask in ((False, None), (True, future)):
        expected = ref(x, x, x, key_padding_mask=~keep, attn_mask=attn_mask, need_weights=False)[0]
        torch.testing.assert_close(attn(x, keep, causal), expected)
    torch.testing.assert_close(attn(x, causal=True), ref(x, x, x, attn_mask=future, need_weights=False)[0])


def test_padding_mask_hides_padded_keys():
    torch.manual_seed(0)
    net = Transformer(width=16, layers=2, heads=2).eval()
    x = torch.randn(1, 5, 16)
    keep = torch.tensor([[True, True, True, False, False]])
    y = net(x, padding_mask=keep)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 2, 16) * 10  # change only the padded positions
    y2 = net(x2, padding_mask=keep)
    torch.testing.assert_close(y[:, :3], y2[:, :3])
    assert torch.isfinite(y2).all()
    # without the mask the real tokens do see the change
    assert not torch.allclose(net(x)[:, :3], net(x2)[:, :3])


# ---- text encoder ----
def test_text_is_pooled_at_the_end_of_text_token_and_causal(module):
    tokens = module.tokenize(["a small red circle"])  # [1, L]
    eot = int((tokens[0] == module.tokenizer.eot_id).nonzero()[0])
    features, pooled = module.encode_text(tokens)
    text = module.model.text
    expected = F.normalize(features[0, eot] @ text.text_projection, dim=-1)
    torch.testing.assert_close(pooled[0], expected)
    assert pooled.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)

    # causal: changing the token at position eot - 1 changes nothing before it, and changes the pooled output
    changed = tokens.clone()
    changed[0, eot - 1] = module.tokenizer.encode("blue")[0]
    features2, pooled2 = module.encode_text(changed)
    torch.testing.assert_close(features2[0, : eot - 1], features[0, : eot - 1])
    assert not torch.allclose(features2[0, eot - 1], features[0, eot - 1])
    assert not torch.allclose(pooled2, pooled)
    # tokens after eot (padding) never reach the pooled output
    junk = tokens.clone()
    junk[0, eot + 1:] = module.tokenizer.encode("square")[0]
    torch.testing.assert_close(module.encode_text(junk)[1], pooled)


def test_dropping_the_padding_tail_keeps_the_pooled_embedding(module):
    tokens = module.tokenize(CAPTIONS)
    short = tokens[:, : int((tokens != module.tokenizer.pad_id).sum(1).max())]
    assert short.shape[1] < tokens.shape[1]
    torch.testing.assert_close(module.encode_text(short)[1], module.encode_text(tokens)[1], rtol=1e-5, atol=1e-6)


def test_image_encoder_output_and_size_check(module):
    emb = module.encode_image(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="16x16"):  # the network checks; the stage resizes (test below)
        module.model.encode_image(torch.zeros(1, 3, 32, 32))


def test_mean_pooling_has_no_class_token():
    vision = VisionConfig(image_size=16, patch_size=4, width=16, layers=1, heads=2, pool="mean")
    clip = CLIP(vision, TextConfig(vocab_size=10, context_length=4, eot_id=1, width=16, layers=1, heads=2), 8)
    assert clip.visual.class_embedding is None and clip.visual.positional_embedding.shape == (16, 16)
    with pytest.raises(ValueError, match="pool"):
        VisionConfig(pool="max")


def test_logit_scale_starts_at_clip_temperature_and_is_clamped_at_100(module):
    clip = module.model
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        clip.logit_scale.fill_(7.0)
    assert clip.scale().item() == pytest.approx(100.0, rel=1e-5)  # clamped in use
    clip.clamp_logit_scale_()
    assert clip.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)  # and in the parameter itself
    # the stage clamps after every training batch
    with torch.no_grad():
        clip.logit_scale.fill_(9.0)
    module.on_train_batch_end(None, None, 0)
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0))


def test_text_config_must_agree_with_the_tokenizer(tokenizer_file):
    with pytest.raises(ValueError, match="text.vocab_size = 7 does not match the tokenizer"):
        CLIPModule(tokenizer_path=str(tokenizer_file), **{**TINY, "text": dict(vocab_size=7)})
    with pytest.raises(ValueError, match="tokenizer_path is required"):
        CLIPModule(**TINY)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CLIPModule(tokenizer_path="nope.json", **TINY)


# ---- validation metrics ----
def test_retrieval_counts_any_item_with_the_same_caption_as_correct():
    captions = ["a", "b", "a", "c"]
    ids = caption_ids(captions)
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    queries = torch.eye(4)
    # query 0 retrieves item 2 (same caption "a": correct); query 1 retrieves item 3 ("c" != "b": wrong)
    gallery = torch.eye(4)[[2, 3, 0, 1]]
    r = retrieval_recall(queries, gallery, ids, ids, ks=(1, 2), chunk=3)
    # top-1 per query: q0->item2 ("a", hit), q1->item3 ("c", miss), q2->item0 ("a", hit), q3->item1 ("b", miss)
    assert r[1] == pytest.approx(0.5)
    assert r[2] >= r[1]


def test_recall_chance_matches_closed_form():
    ids = caption_ids(["a", "a", "b", "c", "d"])
    chance = recall_chance(ids, ids, ks=(1, 2))
    # "a" queries: 2 of 5 items match; others 1 of 5. r@1 = (2*2/5 + 3*1/5) / 5
    assert chance[1] == pytest.approx((2 * 2 / 5 + 3 / 5) / 5)
    # r@2 = 1 - P(no match in 2 draws): a: 1 - 3/5*2/4; others: 1 - 4/5*3/4
    assert chance[2] == pytest.approx((2 * (1 - 3 / 5 * 2 / 4) + 3 * (1 - 4 / 5 * 3 / 4)) / 5)


# ---- checkpoints ----
def _save_checkpoint(module, path):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


def test_checkpoint_round_trip_with_weights_only(module, tmp_path, tokenizer_file):
    path = tmp_path / "clip.ckpt"
    _save_checkpoint(module, path)
    raw = torch.load(path, weights_only=True)
    assert raw["lit_diffusion"]["kind"] == "clip"
    assert Tokenizer.from_json(raw["lit_diffusion"]["tokenizer"]).to_json() == module.tokenizer.to_json()
    tokenizer_file.rename(tokenizer_file.with_suffix(".moved"))  # the checkpoint must not need the file
    try:
        loaded = CLIPModule.from_checkpoint(path)
    finally:
        tokenizer_file.with_suffix(".moved").rename(tokenizer_file)
    assert not loaded.training
    tokens = loaded.tokenize(CAPTIONS)
    assert torch.equal(tokens, module.tokenize(CAPTIONS))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), module.encode_image(images), rtol=0, atol=0)
        for a, b in zip(loaded.encode_text(tokens), module.encode_text(tokens)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.text_width == 32 and loaded.embed_dim == 16 and loaded.image_size == 16


def test_wrong_kind_and_missing_checkpoints_are_refused(tmp_path):
    vae = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}, "lit_diffusion": stage_block("vae", scale_factor=1.0)}, vae)
    with pytest.raises(CheckpointError, match="is a 'vae' checkpoint, expected a 'clip' checkpoint"):
        CLIPModule.from_checkpoint(vae)
    with pytest.raises(CheckpointError, match="not found"):
        CLIPModule.from_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_with_mismatched_weights_is_refused(module, tmp_path):
    path = tmp_path / "clip.ckpt"
    _save_checkpoint(module, path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["model.visual.proj"]
    with pytest.raises(CheckpointError, match="missing .*model.visual.proj"):
        CLIPModule.from_checkpoint_dict(ckpt, source="broken.ckpt")


# ---- hard negatives ----
def test_swap_words_swaps_both_ways_whole_words_and_keeps_capitals():
    swap_words = WordSwaps({"above": "below", "left": "right", "on top of": "under"})
    assert swap_words("a red circle above a blue square") == "a red circle below a blue square"
    assert swap_words("Below the box, left of it") == "Above the box, right of it"
    assert swap_words("a cat on top of a mat") == "a cat under a mat"
    assert swap_words("leftover abovementioned") is None  # whole words only
    assert swap_words("a small red circle") is None


def test_contradictory_swap_pairs_are_refused_naming_the_option(tokenizer_file):
    with pytest.raises(ValueError, match="hard_negatives: 'below' is paired with both 'above' and 'under'"):
        swap_table({"above": "below", "under": "below"})
    with pytest.raises(ValueError, match=r"model\.init_args\.hard_negatives: 'up' -> 'up'"):
        CLIPModule(tokenizer_path=str(tokenizer_file), hard_negatives={"up": "up"}, **TINY)


def test_negative_embeddings_are_the_swapped_captions_in_their_rows(tokenizer_file):
    torch.manual_seed(0)
    module = CLIPModule(tokenizer_path=str(tokenizer_file), hard_negatives={"above": "below", "left": "right"},
                        **TINY).eval()
    with torch.no_grad():
        negatives, mask = module.negative_embeddings(CAPTIONS)
        swapped = ["a small green triangle below a large red square",
                   "a large yellow circle right of a small cyan triangle"]
        expected = module.encode_text(module.tokenize(swapped))[1]
    assert mask.tolist() == [[False], [False], [True], [True]]  # one slot a caption: the word swap
    torch.testing.assert_close(negatives[2:, 0], expected, rtol=1e-5, atol=1e-6)
    assert not negatives[:2].any()
    assert CLIPModule(tokenizer_path=str(tokenizer_file), **TINY).negative_embeddings(CAPTIONS) is None


def test_binding_swaps_exchange_two_objects_attributes():
    swaps = BindingSwaps({"color": ["red", "blue", "green"], "shape": ["circle", "square", "triangle"]})
    assert swaps("a small red circle moving left and a large blue square moving up") == {
        "color": "a small blue circle moving left and a large red square moving up",
        "shape": "a small red square moving left and a large blue circle moving up"}
    # the first word with the next *different* one; a capital stays with its place; whole words only
    assert swaps("Red circle, red square and green square")["color"] == "Green circle, red square and red square"
    assert swaps("a red circle above a red square") == {"color": None, "shape": "a red square above a red circle"}
    assert swaps("a reddish circle") == {"color": None, "shape": None}
    with pytest.raises(ValueError, match=r"binding_negatives: 'red' is in both 'color' and 'hue'"):
        BindingSwaps({"color": ["red", "blue"], "hue": ["red", "green"]})
    with pytest.raises(ValueError, match=r"opt\.color: a group needs two or more different words"):
        BindingSwaps({"color": ["red", "Red"]}, "opt")
    with pytest.raises(ValueError, match="group name 'two words' is not a plain identifier"):
        BindingSwaps({"two words": ["a", "b"]})
    # the same two objects listed the other way round: still a true caption, so no negative
    assert swaps("a small red circle moving left and a small blue circle moving left") == {"color": None,
                                                                                          "shape": None}
    assert swaps("a red circle and a blue circle and a green square")["color"] is None  # the same three objects
    assert swaps("a red circle and a blue circle and a green square")["shape"] == \
        "a red square and a blue circle and a green circle"
    with pytest.raises(ValueError, match=r"'light' \(tone\) is a word of 'light blue' \(color\)"):
        BindingSwaps({"color": ["light blue", "red"], "tone": ["light", "dark"]})


def test_negative_slots_are_the_word_swap_then_one_per_binding_group(tokenizer_file):
    torch.manual_seed(0)
    module = CLIPModule(tokenizer_path=str(tokenizer_file), hard_negatives={"above": "below"},
                        binding_negatives={"color": ["red", "green", "yellow", "cyan", "blue"],
                                           "size": ["small", "large"]}, **TINY).eval()
    assert module.negative_kinds == ["words", "color", "size"]
    expected = {(2, 0): "a small green triangle below a large red square",
                (2, 1): "a small red triangle above a large green square",
                (2, 2): "a large green triangle above a small red square",
                (3, 1): "a large cyan circle left of a small yellow triangle",
                (3, 2): "a small yellow circle left of a large cyan triangle"}
    with torch.no_grad():
        negatives, mask = module.negative_embeddings(CAPTIONS)
        for (i, k), caption in expected.items():
            torch.testing.assert_close(negatives[i, k], module.encode_text(module.tokenize([caption]))[1][0],
                                       rtol=1e-5, atol=1e-6)
    assert negatives.shape == (4, 3, 16) and mask.nonzero().tolist() == sorted(list(k) for k in expected)
    assert not negatives[~mask].any()
    # a twin that an earlier slot already holds is not a second negative: the left/right swap of "... moving left
    # and ... moving right" is also its direction binding swap
    both = CLIPModule(tokenizer_path=str(tokenizer_file), hard_negatives={"left": "right"},
                      binding_negatives={"direction": ["left", "right"]}, **TINY)
    assert both.negative_captions("a red circle left of a blue square right of it") == [
        "a red circle right of a blue square left of it", None]
    assert both.negative_captions("a red circle left of a blue square") == ["a red circle right of a blue square",
                                                                            None]
    with pytest.raises(ValueError, match="'words' names the hard_negatives slot"):
        CLIPModule(tokenizer_path=str(tokenizer_file), binding_negatives={"words": ["a", "b"]}, **TINY)
    args = {**CLIPModule.accepted_args(dict(module.hparams)), "tokenizer_json": module.tokenizer.to_json(),
            "tokenizer_path": None}
    reloaded = CLIPModule(**args)  # as a checkpoint rebuilds it
    assert reloaded.negative_kinds == module.negative_kinds


def test_images_of_another_size_are_cropped_and_resized_as_clip_preprocesses_them(module):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    images = torch.rand(2, 3, 40, 48) * 2 - 1  # the tower reads 16 px: crop to 40 x 40, resize to 16
    reference = TF.resize(TF.center_crop(images, [40, 40]), [16, 16], interpolation=InterpolationMode.BICUBIC,
                          antialias=True).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(module.encode_image(images), module.encode_image(reference), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(module.encode_image(images), module.encode_image(images[..., :16, :16]), atol=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")  # before val/loss was logged at the epoch's end, gloo aborted here
@pytest.mark.parametrize("val_max_samples", [None, 1])
def test_two_ranks_validate_as_one_process_also_when_one_rank_has_no_val_batch(tmp_path, val_max_samples):
    """Retrieval figures are gathered and val/loss is logged at the epoch's end on every rank: with one val sample
    rank 1 has no batch, and the figures are still the one-process ones."""
    import lightning as L

    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.data.shapes import write_shapes

    info = write_shapes(tmp_path / "data", train=8, val=8, size=16, shard_size=8, seed=0)
    torch.manual_seed(0)
    # a word swap and two binding groups: the per-kind wins are gathered too (4 of the 8 val captions have two
    # objects, 3 of them a relation word)
    module = CLIPModule(tokenizer_path=str(tmp_path / "data" / "tokenizer.json"),
                        hard_negatives={"above": "below", "left": "right"},
                        binding_negatives={"color": ["red", "green", "blue", "yellow", "purple", "cyan"],
                                           "size": ["small", "large"]}, **TINY)

    def validate(**kwargs):
        data = ImageCaptionDataModule(train_urls=info["urls"]["train"], val_urls=info["urls"]["val"], image_size=16,
                                      batch_size=4, num_workers=0, val_max_samples=val_max_samples)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path), **kwargs)
        return trainer.validate(module, datamodule=data, verbose=False)[0]

    single = validate(devices=1)
    ddp = retry_on_gloo_teardown_abort(lambda: validate(devices=2, strategy="ddp_spawn"))
    assert "val/loss" in single and "val/i2t_r1" in single and set(ddp) == set(single)
    if val_max_samples is None:
        assert {"val/negative_acc", "val/binding_acc_color", "val/binding_acc_size"} <= set(single)
    # the contrastive loss is over a batch, and two ranks batch the samples otherwise (0, 2, 4, 6 and 1, 3, 5, 7):
    # equal only when the batches are the same (one sample); the gathered retrieval figures always
    for key in single if val_max_samples == 1 else set(single) - {"val/loss"}:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
