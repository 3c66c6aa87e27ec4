import random

import pytest
import torch

from lit_diffusion.data.shapes import sample_attrs
from lit_diffusion.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def captions():
    rng = random.Random(0)
    return [sample_attrs(rng)["caption"] for _ in range(300)]


@pytest.fixture(scope="module")
def tok(captions):
    return Tokenizer.train(captions, vocab_size=1000, context_length=16)


def test_layout_special_tokens_and_padding(tok, captions):
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (0, 1, 2)
    ids = tok(captions[:5])
    assert ids.dtype == torch.long and ids.shape == (5, 16)
    for row, caption in zip(ids, captions[:5]):
        body = tok.encode(caption)
        n = len(body)
        assert row[0] == tok.sot_id and row[n + 1] == tok.eot_id
        assert row[1 : n + 1].tolist() == body
        assert (row[n + 2 :] == tok.pad_id).all()
        assert tok.decode(row) == caption
    # shapes words are whole tokens after training: "a small red circle" is 4 tokens
    assert len(tok.encode("a small red circle")) == 4
    assert int(ids.max()) < tok.vocab_size


def test_lowercase_and_punctuation(tok):
    assert tok.encode("A SMALL Red circle") == tok.encode("a small red circle")
    assert tok.decode(tok(["A small, red circle!"])[0]) == "a small , red circle !"


def test_truncation_keeps_end_token(tok):
    long = " ".join(["a small red circle above a large blue square"] * 10)
    row = tok([long])[0]
    assert row[0] == tok.sot_id and row[-1] == tok.eot_id and tok.pad_id not in row.tolist()
    assert row[1:-1].tolist() == tok.encode(long)[:14]


def test_unseen_words_spell_out(tok):
    assert tok.decode(tok(["zebra 42"])[0]) == "zebra 42"
    assert "<unk>" in tok.decode(tok(["日本"])[0])


def test_json_round_trip_is_bit_exact(tok, captions, tmp_path):
    text = tok.to_json()
    again = Tokenizer.from_json(text)
    assert again.to_json() == text
    assert torch.equal(again(captions), tok(captions))
    assert (again.vocab_size, again.context_length) == (tok.vocab_size, 16)
    tok.save(tmp_path / "tok.json")
    assert Tokenizer.load(tmp_path / "tok.json").to_json() == text


def test_training_is_deterministic(captions):
    assert Tokenizer.train(captions).to_json() == Tokenizer.train(captions).to_json()


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
