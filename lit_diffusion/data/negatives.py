"""Hard negative captions for contrastive training: a caption made false by swapping words (NegCLIP).

`WordSwaps({"above": "below"})("a red circle above a blue square")` -> "a red circle below a blue square".
Pairs apply both ways and match whole words or phrases, case-insensitively; a swap keeps a capital first letter.

`BindingSwaps({"color": ["red", "blue", ...]})` makes the other kind of NegCLIP negative: the caption with two of
its objects' attributes exchanged, "a red circle moving left and a blue square moving up" -> "a blue circle moving
left and a red square moving up". Every word is still true of some object; only which object has it is false, so
a text encoder that reads a caption as a bag of words cannot tell the two apart.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence


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


class BindingSwaps:
    """`BindingSwaps(groups)(caption)`: {group: the caption with its first word of the group exchanged with the next
    different word of the group, or None where it holds fewer than two different ones}. `groups`: {name: [words]}
    (colours, shapes, sizes, directions: the attributes an object of a caption binds); names become metric names,
    so they are plain identifiers. A twin that only lists the same objects in another order is no negative
    ("a red circle and a blue circle" -> "a blue circle and a red circle"): it is None. A word in two groups (also
    as a word of another group's phrase), a group of fewer than two words or a bad name is an error naming
    `option`."""

    def __init__(self, groups: Mapping[str, Sequence[str]], option: str = "binding_negatives"):
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError(f"{option}: expected {{group: [word, ...]}}, got {groups!r}")
        owner: dict[str, str] = {}
        self.patterns: dict[str, re.Pattern] = {}
        for name, words in groups.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
                raise ValueError(f"{option}: group name {name!r} is not a plain identifier (it names a metric)")
            if isinstance(words, str) or len({str(w).strip().lower() for w in words}) < 2:
                raise ValueError(f"{option}.{name}: a group needs two or more different words, got {words!r}")
            cleaned = sorted({str(w).strip().lower() for w in words}, key=len, reverse=True)
            for word in cleaned:
                if not word:
                    raise ValueError(f"{option}.{name}: an empty word")
                if owner.setdefault(word, str(name)) != str(name):
                    raise ValueError(f"{option}: {word!r} is in both {owner[word]!r} and {name!r}")
            self.patterns[str(name)] = re.compile(r"\b(" + "|".join(re.escape(w) for w in cleaned) + r")\b",
                                                  re.IGNORECASE)
        for word, name in owner.items():  # "light" in a tone group and "light blue" in the colours: ambiguous
            whole = re.compile(rf"\b{re.escape(word)}\b")
            inside = [w for w, n in owner.items() if n != name and whole.search(w)]
            if inside:
                raise ValueError(f"{option}: {word!r} ({name}) is a word of {inside[0]!r} ({owner[inside[0]]})")

    @property
    def names(self) -> list[str]:
        return list(self.patterns)

    @staticmethod
    def _swap(caption: str, pattern: re.Pattern) -> str | None:
        matches = list(pattern.finditer(caption))
        if not matches:
            return None
        first = matches[0]
        second = next((m for m in matches[1:] if m.group(0).lower() != first.group(0).lower()), None)
        if second is None:
            return None

        def cased(word: str, like: str) -> str:
            return word[:1].upper() + word[1:] if like[:1].isupper() else word

        a, b = first.group(0).lower(), second.group(0).lower()
        return (caption[: first.start()] + cased(b, first.group(0)) + caption[first.end(): second.start()]
                + cased(a, second.group(0)) + caption[second.end():])

    @staticmethod
    def _objects(caption: str) -> list[str]:
        """The caption's "and"-joined parts, lower case and sorted: the same objects listed in any order."""
        return sorted(part.strip().lower() for part in re.split(r"\band\b", caption))

    def __call__(self, caption: str) -> dict[str, str | None]:
        out = {}
        for name, pattern in self.patterns.items():
            twin = self._swap(caption, pattern)
            out[name] = None if twin is not None and self._objects(twin) == self._objects(caption) else twin
        return out
