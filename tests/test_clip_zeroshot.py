"""Zero-shot classes and prompts come from the data (config or info.json), not from the shapes module."""

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from lit_diffusion.data.convert import convert
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.shapes import caption_of, sample_attrs, write_shapes
from lit_diffusion.data.tokenizer import Tokenizer
from lit_diffusion.stages.clip import CLIPModule, ZeroshotLabeler, zeroshot_spec

TINY = dict(vision=dict(image_size=8, patch_size=4, width=16, layers=1, heads=2),
            text=dict(width=16, layers=1, heads=2), embed_dim=3)
FRUIT = {"classes": ["apple", "leaf", "sky"], "templates": ["a photo of a {}.", "a picture of the {}"]}
COLOUR_OF = {"apple": (1.0, 0.0, 0.0), "leaf": (0.0, 1.0, 0.0), "sky": (0.0, 0.0, 1.0)}


class ColourCLIP(CLIPModule):
    """A CLIP whose answers we know: an image embeds as its mean colour, a text as the colour of the class word
    it holds (zero if none), so a val image is classified as the class of its colour."""

    def tokenize(self, texts):
        return list(texts)

    def encode_text(self, texts):
        rows = [next((COLOUR_OF[w] for w in COLOUR_OF if w in t), (0.0, 0.0, 0.0)) for t in texts]
        return None, F.normalize(torch.tensor(rows), dim=-1)  # [B, 3]

    def model_step(self, batch, loss_fn):
        image = F.normalize(batch["image"].mean((2, 3)) + 1, dim=-1)  # [-1, 1] -> red [1, 0, 0], ...
        text = self.encode_text(batch["caption"])[1]
        return image.sum() * 0, image, text, torch.tensor(1.0), None


def _write(folder, name, rgb, caption, attrs=None):
    Image.new("RGB", (8, 8), rgb).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(caption)
    if attrs is not None:
        (folder / f"{name}.json").write_text(json.dumps(attrs))


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    Tokenizer.train(["a photo of an apple", "a leaf", "the sky"] * 3, vocab_size=100, context_length=16).save(path)
    return path


def test_zeroshot_on_converted_non_shapes_shards_matches_the_written_out_count(tmp_path, tokenizer_file):
    images = tmp_path / "images"
    images.mkdir()
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    _write(images, "a", red, "an Apple on a table")                  # apple, predicted apple: right
    _write(images, "b", green, "a fallen leaf")                      # leaf, predicted leaf: right
    _write(images, "c", blue, "a clear sky over the sea")            # sky, predicted sky: right
    _write(images, "d", blue, "a leaf in the wind")                  # leaf, predicted sky: wrong
    _write(images, "e", red, "a still life", {"label": "apple"})     # KEY.json label: apple, right
    _write(images, "f", green, "apples", {"label": "sky"})           # the label beats the caption: sky, wrong
    _write(images, "g", red, "an apple under the sky")               # two classes named: left out
    _write(images, "h", green, "pineapple juice")                    # no class as a whole word: left out
    info = convert(images, tmp_path / "shards", split="val")
    module = ColourCLIP(tokenizer_path=str(tokenizer_file), zeroshot=FRUIT, **TINY)
    data = ImageCaptionDataModule(train_urls=info["urls"]["val"], val_urls=info["urls"]["val"], image_size=8,
                                  batch_size=3, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert metrics["val/zeroshot_acc"] == pytest.approx(4 / 6)
    assert metrics["val/zeroshot_chance"] == pytest.approx(1 / 3)

    # the same classes from a JSON file beside the shards; without any, no zero-shot figure
    (tmp_path / "shards" / "classes.json").write_text(json.dumps({"zeroshot": FRUIT}))
    module = ColourCLIP(tokenizer_path=str(tokenizer_file), zeroshot=str(tmp_path / "shards" / "classes.json"),
                        **TINY)
    assert trainer.validate(module, data, verbose=False)[0]["val/zeroshot_acc"] == pytest.approx(4 / 6)
    module = ColourCLIP(tokenizer_path=str(tokenizer_file), **TINY)
    assert "val/zeroshot_acc" not in trainer.validate(module, data, verbose=False)[0]


def test_shapes_classes_come_from_info_json_and_the_config_says_the_same(tmp_path):
    info = write_shapes(tmp_path, train=10, val=4, shard_size=10)
    config = yaml.safe_load(open("configs/clip/shapes.yaml"))["model"]["init_args"]["zeroshot"]
    assert zeroshot_spec(str(tmp_path / "info.json")) == zeroshot_spec(config) == info["zeroshot"]
    assert len(config["classes"]) == 18 and config["templates"] == ["a small {}", "a large {}"]
    labeler = ZeroshotLabeler(config["classes"])
    seen = set()
    for seed in range(200):  # a single object is its colour x shape; two objects name two classes: left out
        attrs = sample_attrs(seed)
        label = labeler(attrs, caption_of(attrs))
        objects = attrs["objects"]
        if len(objects) == 1:
            assert config["classes"][label] == f"{objects[0]['color']} {objects[0]['shape']}"
            seen.add(label)
        else:
            assert label == -1
    assert len(seen) == 18


def test_accuracy_takes_the_best_prompt_per_class(tokenizer_file):
    torch.manual_seed(0)
    module = CLIPModule(tokenizer_path=str(tokenizer_file), zeroshot=FRUIT, **TINY).eval()
    prompts = module.zeroshot_prompt_embeddings()  # [P, C, E]
    assert prompts.shape == (2, 3, 3)
    expected = module.encode_text(module.tokenize(["a picture of the leaf"]))[1][0]
    torch.testing.assert_close(prompts[1, 1], expected)
    labels = torch.tensor([0, 1, 2, -1])
    images = prompts[1, labels.clamp_min(0)]  # images equal to a class's second prompt
    assert module.zeroshot_accuracy(images, labels) == 1.0
    assert module.zeroshot_accuracy(images, torch.full((4,), -1)) is None


@pytest.mark.parametrize("bad, message", [
    ({"classes": ["a", "a"], "templates": ["{}"]}, r"zeroshot.classes must be distinct"),
    ({"classes": ["a"], "templates": ["a photo"]}, r"zeroshot.templates: 'a photo' needs a \{\}"),
    ({"classes": ["a"]}, r"model.init_args.zeroshot must be \{classes"),
    ("missing.json", r"model.init_args.zeroshot: cannot read a JSON object from missing.json"),
])
def test_bad_zeroshot_config_names_the_option(bad, message):
    with pytest.raises(ValueError, match=message):
        zeroshot_spec(bad)


def test_json_file_without_a_zeroshot_block_is_named(tmp_path):
    (tmp_path / "info.json").write_text(json.dumps({"dataset": "converted"}))
    with pytest.raises(ValueError, match=r"info.json has no `zeroshot` block"):
        zeroshot_spec(str(tmp_path / "info.json"))
