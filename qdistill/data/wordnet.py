"""``wordnet-10``: WordNet noun glosses labelled with their lexicographer category.

Every noun synset of WordNet 3.0 sits in one lexicographer file (``noun.animal``,
``noun.artifact``, ... see ``man 5 lexnames``) and carries a gloss, a one-line definition
("a domesticated carnivorous mammal ..."). ``wordnet-10`` is the task of telling ten of those
categories (:data:`CATEGORIES`, 2,000-11,600 glosses each) apart from the definition alone:
clean labels (a lexicographer chose them), short inputs (about 15 tokens), thousands of
examples per class, and a balanced test set, so accuracy and balanced accuracy agree and
differences between methods are not drowned by a few test sentences.

The glosses are read straight from ``data.noun`` of Debian's ``wordnet-base``
(``sudo apt-get install wordnet-base``; ``make data`` does it when run as root). Each line is
``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the two-digit ``lex_filenum`` is
the category (its names are fixed by WordNet, :data:`LEXNAMES`). The split is seeded: every
category is shuffled by ``seed``, its first ``test_per_class`` glosses are the test set, the
rest are training examples (``per_class`` of them when asked). Glosses of the other noun
categories, verbs, adjectives and adverbs are general text for continual pre-training
(:func:`general_text`), never a task sentence.
"""

from __future__ import annotations

import random
from pathlib import Path

from qdistill.data.fortunes import TextSplit
from qdistill.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
# lexicographer file numbers of WordNet 3.0 (lexnames(5WN)); 0-2 and 29-44 are adj/adv/verb
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location",
    16: "noun.motive", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}  # fmt: skip
# ten categories with distinct subjects and >= 2,000 glosses each
CATEGORIES = (
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.communication",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "noun.substance",
)


def _root(root: str | Path | None) -> Path:
    root = Path(root) if root is not None else WORDNET_DIR
    if not (root / "data.noun").is_file():
        raise DataError(
            f"no WordNet data.noun in {root}; install it with `sudo apt-get install wordnet-base` "
            "(or pass root= a folder holding WordNet's data.* files)"
        )
    return root


def read_glosses(path: str | Path, definition_only: bool = True) -> list[tuple[int, str]]:
    """``(lex_filenum, gloss)`` of every synset in a WordNet ``data.*`` file.

    ``definition_only`` keeps the definition and drops the quoted usage examples that follow
    it (``; "the dog barked all night"``), which often name the word being defined.
    """
    try:
        raw = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read WordNet file {path}: {exc}") from None
    out = []
    for line in raw.splitlines():
        if not line or line.startswith("  "):  # the license header is indented
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 2 or not fields[1].isdigit():
            continue
        if definition_only:
            gloss = gloss.split('; "')[0]
        gloss = " ".join(gloss.split())
        if gloss:
            out.append((int(fields[1]), gloss))
    return out


def _by_category(root: Path, categories: tuple[str, ...]) -> dict[str, list[str]]:
    """Each category's glosses, without repeats or glosses that two categories share."""
    numbers = {name: num for num, name in LEXNAMES.items()}
    unknown = [c for c in categories if c not in numbers]
    if unknown:
        raise DataError(f"unknown WordNet noun categories {unknown}; known: {sorted(numbers)}")
    wanted = {numbers[c]: c for c in categories}
    per: dict[str, list[str]] = {c: [] for c in categories}
    owner: dict[str, set[str]] = {}
    for num, gloss in read_glosses(root / "data.noun"):
        if num in wanted:
            per[wanted[num]].append(gloss)
            owner.setdefault(gloss, set()).add(wanted[num])
    return {c: [g for g in dict.fromkeys(gs) if len(owner[g]) == 1] for c, gs in per.items()}


def load_wordnet(
    split: str = "train",
    per_class: int | None = None,
    test_per_class: int = 200,
    categories: tuple[str, ...] = CATEGORIES,
    seed: int = 0,
    root: str | Path | None = None,
) -> TextSplit:
    """One split of ``wordnet-10`` (label ``i`` is ``categories[i]``).

    The test set holds ``test_per_class`` glosses of every category (balanced); the training
    set the first ``per_class`` of the rest (all of them when None). Both are fixed by
    ``seed`` and disjoint; the examples are shuffled.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r}; wordnet-10 has the splits ['train', 'test']")
    for name, value in (("test_per_class", test_per_class), ("per_class", per_class)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{name}={value!r} must be a positive integer")
    root = _root(root)
    texts: list[str] = []
    labels: list[int] = []
    for label, (cat, glosses) in enumerate(_by_category(root, categories).items()):
        if len(glosses) <= test_per_class:
            raise DataError(
                f"{cat} has {len(glosses)} glosses, not more than test_per_class={test_per_class}"
            )
        random.Random(f"{seed}:{cat}").shuffle(glosses)
        part = glosses[:test_per_class] if split == "test" else glosses[test_per_class:]
        if split == "train" and per_class is not None:
            part = part[:per_class]
        texts += part
        labels += [label] * len(part)
    order = list(range(len(texts)))
    random.Random(f"{seed}:{split}").shuffle(order)
    classes = tuple(c.removeprefix("noun.") for c in categories)
    return TextSplit([texts[i] for i in order], [labels[i] for i in order], classes)


def general_text(
    exclude: tuple[str, ...] = CATEGORIES, root: str | Path | None = None, seed: int = 0
) -> list[str]:
    """Glosses (with their usage examples) of every noun category not in ``exclude`` and of all
    verbs, adjectives and adverbs, shuffled: text for continual pre-training that never holds
    a gloss of the task's categories."""
    root = _root(root)
    numbers = {name: num for num, name in LEXNAMES.items()}
    skip = {numbers[c] for c in exclude if c in numbers}
    taken = {g for num, g in read_glosses(root / "data.noun", False) if num in skip}
    texts: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        path = root / f"data.{part}"
        if path.is_file():
            texts += [
                g
                for num, g in read_glosses(path, definition_only=False)
                if not (part == "noun" and num in skip) and g not in taken
            ]
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError(f"no WordNet glosses in {root} beyond the categories {list(exclude)}")
    random.Random(seed).shuffle(texts)
    return texts


__all__ = ["CATEGORIES", "LEXNAMES", "general_text", "load_wordnet", "read_glosses"]
