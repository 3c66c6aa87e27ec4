"""Hard negative captions for contrastive training: a caption made false by swapping words (NegCLIP).

`WordSwaps({"above": "below"})("a red circle above a blue square")` -> "a red circle below a blue square".
Pairs apply both ways and match whole words or phrases, case-insensitively; a swap keeps a capital first letter.
"""

from __future__ import annotations

import re
from typing import Mapping


def swap_table(pairs: Mapping[str, str], option: str = "hard_negatives") -> dict[str, str]:
    """{word: partner} both ways, lower case; a word with two different partners is an error naming `option`."""
    table: dict[str, str] = {}
    for a, b in pairs.items():
        a, b = str(a).strip().lower(), str(b).strip().lower()
        if not a or not b or a == b:
            raise ValueError(f"{option}: {a!r} -> {b!r} is not a swap of two different words")
        for word, partner in ((a, b), (b, a)):
            if table.setdefault(word, partner) != partner:
                raise ValueError(f"{option}: {word!r} is paired with both {table[word]!r} and {partner!r}")
    return table


class WordSwaps:
    """`WordSwaps(pairs)(caption)`: the caption with every word of `pairs` replaced by its partner, or None when it
    holds none of them. The pairs are checked (`swap_table`, errors name `option`) and compiled once."""

    def __init__(self, pairs: Mapping[str, str], option: str = "hard_negatives"):
        self.table = swap_table(pairs, option)
        words = sorted(self.table, key=len, reverse=True)  # longest first: "on top of" before "on"
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def _partner(self, match: re.Match) -> str:
        word = match.group(0)
        swapped = self.table[word.lower()]
        return swapped[:1].upper() + swapped[1:] if word[:1].isupper() else swapped

    def __call__(self, caption: str) -> str | None:
        swapped, count = self.pattern.subn(self._partner, caption)
        return swapped if count else None
