"""Hard negative captions for contrastive training: a caption made false by swapping words (NegCLIP).

`swap_words("a red circle above a blue square", {"above": "below"})` -> "a red circle below a blue square".
Pairs apply both ways and match whole words or phrases, case-insensitively; a swap keeps a capital first letter.
"""

from __future__ import annotations

import re
from typing import Mapping

_compiled: dict[tuple, tuple[re.Pattern, dict[str, str]]] = {}


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


def swap_words(caption: str, pairs: Mapping[str, str]) -> str | None:
    """`caption` with every word of `pairs` replaced by its partner, or None when it holds none of them."""
    key = tuple(sorted(pairs.items()))
    if key not in _compiled:
        table = swap_table(pairs)
        words = sorted(table, key=len, reverse=True)  # longest first: "on top of" before "on"
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        _compiled[key] = pattern, table
    pattern, table = _compiled[key]

    def partner(match: re.Match) -> str:
        word = match.group(0)
        swapped = table[word.lower()]
        return swapped[:1].upper() + swapped[1:] if word[:1].isupper() else swapped

    swapped, count = pattern.subn(partner, caption)
    return swapped if count else None
