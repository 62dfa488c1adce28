"""Topic classification on the Debian ``fortunes`` package: a small offline text task.

The package installs one file per category under ``/usr/share/games/fortunes/``; entries are
separated by lines holding only ``%``. ``fortunes-10`` is the task of telling ten topical
categories apart (:data:`TOPICS`), split once by a seeded permutation; the other categories
are general text for continual pre-training (BitNet Distillation, stage 2). Install the files
with ``sudo apt-get install fortunes`` (``make data`` does it when run as root).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from qdistill.errors import DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# ten categories with distinct subjects (and 150-1,200 entries each)
TOPICS = (
    "computers",
    "definitions",
    "food",
    "law",
    "linux",
    "love",
    "politics",
    "science",
    "sports",
    "startrek",
)


@dataclass(frozen=True)
class TextSplit:
    """Texts and integer labels, with the category name of each label."""

    texts: list[str]
    labels: list[int]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _root(root: str | Path | None) -> Path:
    root = Path(root) if root is not None else FORTUNES_DIR
    if not root.is_dir():
        raise DataError(
            f"no fortunes files in {root}; install them with `sudo apt-get install fortunes` "
            "(or pass root= a folder of fortune files)"
        )
    return root


def read_fortune_file(path: str | Path) -> list[str]:
    """The entries of one fortune file: text between ``%`` lines, whitespace-normalised."""
    try:
        raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read fortune file {path}: {exc}") from None
    entries, current = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append(current)
            current = []
        else:
            current.append(line)
    entries.append(current)
    # the files use backspace overstriking for bold/underline: keep the printed character
    texts = [" ".join(" ".join(e).replace("\b", "").split()) for e in entries]
    return [t for t in texts if t]


def categories(root: str | Path | None = None) -> list[str]:
    """Category names present in ``root`` (fortune files are those with a ``.dat`` index)."""
    root = _root(root)
    return sorted(p.stem for p in root.glob("*.dat") if (root / p.stem).is_file())


def _unique_entries(root: Path, topics: tuple[str, ...]) -> dict[str, list[str]]:
    """Each topic's entries, without repeats and without texts that two topics share (the same
    quip filed under two categories has no single label, and could land in train and test)."""
    per_topic = {t: list(dict.fromkeys(read_fortune_file(root / t))) for t in topics}
    seen: dict[str, int] = {}
    for entries in per_topic.values():
        for text in entries:
            seen[text] = seen.get(text, 0) + 1
    return {t: [e for e in entries if seen[e] == 1] for t, entries in per_topic.items()}


def load_fortunes(
    split: str = "train",
    topics: tuple[str, ...] = TOPICS,
    test_fraction: float = 0.2,
    seed: int = 0,
    root: str | Path | None = None,
    max_per_class: int | None = None,
) -> TextSplit:
    """One split of fortunes topic classification (label ``i`` is ``topics[i]``).

    Each category (repeats and texts shared with another topic removed) is permuted by
    ``seed`` and its first ``test_fraction`` goes to ``test``, so the splits are disjoint,
    stratified and the same on every machine. ``max_per_class`` keeps
    only the first entries of each class of the split (a smaller, still balanced-ish run).
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r}; fortunes has the splits ['train', 'test']")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}; choose a fraction between 0 and 1")
    root = _root(root)
    missing = [t for t in topics if not (root / t).is_file()]
    if missing:
        raise DataError(
            f"fortune categories {missing} are not in {root}; available: {categories(root)}"
        )
    texts, labels = [], []
    for label, (topic, entries) in enumerate(_unique_entries(root, topics).items()):
        random.Random(f"{seed}:{topic}").shuffle(entries)
        n_test = max(1, round(len(entries) * test_fraction))
        part = entries[:n_test] if split == "test" else entries[n_test:]
        if max_per_class is not None:
            part = part[:max_per_class]
        texts += part
        labels += [label] * len(part)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return TextSplit([texts[i] for i in order], [labels[i] for i in order], tuple(topics))


def general_text(
    exclude: tuple[str, ...] = TOPICS, root: str | Path | None = None, seed: int = 0
) -> list[str]:
    """Entries of every category not in ``exclude``, shuffled: text for continual pre-training.

    Texts that also occur in an excluded category (the task's) are left out, so continual
    pre-training never reads a test sentence.
    """
    root = _root(root)
    taken = {
        t for name in exclude if (root / name).is_file() for t in read_fortune_file(root / name)
    }
    texts: list[str] = []
    for name in categories(root):
        if name not in exclude:
            texts += [t for t in dict.fromkeys(read_fortune_file(root / name)) if t not in taken]
    if not texts:
        raise DataError(f"no fortune categories in {root} beyond {list(exclude)}")
    random.Random(seed).shuffle(texts)
    return texts


__all__ = ["TOPICS", "TextSplit", "categories", "general_text", "load_fortunes"]
