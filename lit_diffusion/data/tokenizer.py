"""Caption tokenizer: a small BPE (`tokenizers`) with CLIP-style start/end tokens and a fixed context length.

The stage that owns a text encoder owns its tokenizer and stores `to_json()` in its checkpoint, so a trained
model always tokenizes exactly as it did in training.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"  # characters never seen in training map here instead of vanishing silently
_WORD_END = "</w>"  # as in CLIP's BPE: marks the last piece of a word so decoding can restore spaces
_FORMAT = "lit_diffusion.tokenizer/1"


def _canonical_ids(tok: _HFTokenizer) -> _HFTokenizer:
    """Renumber the vocabulary (special tokens, then base symbols sorted, then merges in merge order).

    The BPE trainer numbers base symbols in hash-map order, so the same captions would give different ids
    (and checkpoints that disagree on them) from run to run. Its merges are deterministic unless two pairs tie in
    frequency, which it breaks by those ids: on a handful of captions (6 moving-shapes captions: 5 different
    results in 10 runs) the merges differ too, and on 40 they did in one test run of many."""
    blob = json.loads(tok.to_str())
    model = blob["model"]
    specials = {t["content"]: t["id"] for t in blob["added_tokens"]}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    merged = [a + b for a, b in merges]
    merged_set = set(merged)
    base = sorted(t for t in model["vocab"] if t not in specials and t not in merged_set)
    vocab = dict(sorted(specials.items(), key=lambda kv: kv[1]))
    for token in base + merged:
        vocab.setdefault(token, len(vocab))
    model["vocab"] = vocab
    return _HFTokenizer.from_str(json.dumps(blob))


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, context_length: int = 32, pad_id: int | None = None):
        """pad_id: the id after the end-of-text token; None = the `<pad>` token's. Imported CLIP vocabularies
        have no `<pad>`: OpenAI / open_clip pad with 0, Hugging Face folders with their `pad_token`."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must leave room for start and end tokens (>= 2)")
        self._tok = tokenizer
        self.context_length = int(context_length)
        ids = {name: tokenizer.token_to_id(name) for name in (SOT, EOT) + (() if pad_id is not None else (PAD,))}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.sot_id, self.eot_id = ids[SOT], ids[EOT]
        self.pad_id = ids[PAD] if pad_id is None else int(pad_id)
        self._explicit_pad = pad_id is not None
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def pads_with_ordinary_token(self) -> bool:
        """The padding id is an ordinary vocabulary entry (imported vocabularies), not a `<pad>` of its own: then
        `tokens != pad_id` is not the mask of real tokens (`mask`)."""
        return self._explicit_pad and self._tok.id_to_token(self.pad_id) != PAD

    @classmethod
    def train(
        cls, captions: list[str], vocab_size: int = 1000, context_length: int = 32, min_frequency: int = 1
    ) -> "Tokenizer":
        tok = _HFTokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=_WORD_END))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()]
        )
        # Whitespace splits on \w+|[^\w\s]+, i.e. at spaces and between words and punctuation.
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix=_WORD_END)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[SOT, EOT, PAD, UNK],
            end_of_word_suffix=_WORD_END,
            show_progress=False,
        )
        # One doubled word per printable ASCII character puts both its word-inner ("g") and word-final
        # ("g</w>") pieces in the vocabulary, so unseen words still spell out instead of becoming <unk>.
        alphabet = [c + c for c in string.ascii_lowercase + string.digits + string.punctuation]
        tok.train_from_iterator([*captions, " ".join(alphabet)], trainer=trainer)
        return cls(_canonical_ids(tok), context_length)

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """Tokens [B, context_length] = [sot, tokens..., eot, pad...]; long captions are cut so eot fits."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        keep = self.context_length - 2
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.sot_id, *enc.ids[:keep], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] bool, True up to and including each row's first end-of-text token: the real tokens. By position,
        not `tokens != pad_id`, because imported vocabularies pad with an id that also occurs in text (OpenAI: 0,
        which is "!") or with the end-of-text id itself (Hugging Face)."""
        is_eot = tokens == self.eot_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), tokens.shape[1] - 1)  # [B]
        return torch.arange(tokens.shape[1], device=tokens.device)[None] <= first[:, None]

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without special tokens, padding or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str | list[str]:
        """Text of one row of ids (list or 1-D tensor), or a list of texts for a 2-D tensor; stops at eot."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                return [self.decode(row) for row in ids]
            ids = ids.tolist()
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._tok.decode([i for i in ids if i not in (self.sot_id, self.pad_id)], skip_special_tokens=False)

    def to_json(self) -> str:
        blob = {"format": _FORMAT, "context_length": self.context_length, "tokenizer": self._tok.to_str()}
        if self._explicit_pad:
            blob["pad_id"] = self.pad_id
        return json.dumps(blob, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        blob = json.loads(text)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"not a lit_diffusion tokenizer (expected format {_FORMAT!r})")
        return cls(_HFTokenizer.from_str(blob["tokenizer"]), blob["context_length"], blob.get("pad_id"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise FileNotFoundError(f"cannot read tokenizer file {str(path)!r}: {exc}") from exc
        try:
            return cls.from_json(text)
        except Exception as exc:  # json, format or tokenizers errors: all mean a bad file
            raise ValueError(f"{str(path)!r} is not a valid tokenizer file: {exc}") from exc

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def train_from_shards(urls, out: str | Path, vocab_size: int = 8192, context_length: int = 77,
                      max_captions: int = 200_000) -> Tokenizer:
    """Train a tokenizer on the captions (`.txt` or `.caption`) of the first `max_captions` samples of `urls`; save
    it to `out`. Samples whose caption the data modules would skip (missing, empty, not UTF-8) are skipped here
    too, named and counted."""
    from lit_diffusion.data.shards import BadSample, SkipCounter, _report, decode_text, expand_urls, shard_samples

    captions: list[str] = []
    counter = SkipCounter()
    for url in expand_urls(urls, split="train"):  # a folder of several splits: its train shards only
        for sample in shard_samples(url, counter):
            try:
                captions.append(decode_text(sample)[0])
            except BadSample as bad:
                _report(counter, bad.reason, url, sample.get("__key__"), bad.detail)
            if len(captions) >= max_captions:
                break
        if len(captions) >= max_captions:
            break
    if not captions:
        raise ValueError(f"no captions (.txt) found in {urls}: cannot train a tokenizer")
    tokenizer = Tokenizer.train(captions, vocab_size=vocab_size, context_length=context_length)
    tokenizer.save(out)
    return tokenizer
