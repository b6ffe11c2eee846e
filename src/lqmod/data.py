"""Real text for calibration, finetuning and evaluation, read from local files only.

The data sets (WikiText-2, Penn Treebank, SST-2) are not shipped with lqmod; they are looked
up in ``$LQMOD_DATA_DIR`` or in a ``shared/data`` folder beside the checkout (see
``shared/data/README.md`` for sources and licences). Functions raise
:class:`DataNotFoundError` naming the paths they tried, so tests can skip with the reason.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

__all__ = [
    "DataNotFoundError",
    "data_dir",
    "ptb_lines",
    "sst2",
    "wikitext_paragraphs",
    "wikitext_sentences",
]


class DataNotFoundError(FileNotFoundError):
    pass


def _candidates() -> list[Path]:
    found = []
    if env := os.environ.get("LQMOD_DATA_DIR"):
        found.append(Path(env))
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        found.append(parent / "shared" / "data")
    return found


def data_dir(required: str | None = None) -> Path:
    """The first data folder that exists (and holds ``required``, if given)."""
    tried = []
    for cand in _candidates():
        tried.append(str(cand))
        if cand.is_dir() and (required is None or (cand / required).exists()):
            return cand
    what = f" with {required}" if required else ""
    raise DataNotFoundError(
        f"no data folder{what} found; set LQMOD_DATA_DIR or place shared/data beside the "
        f"checkout. Tried: {', '.join(dict.fromkeys(tried))}"
    )


def wikitext_paragraphs(split: str = "test", min_chars: int = 40) -> list[str]:
    """WikiText-2 raw paragraphs (headings dropped), detokenised lightly (" @-@ " -> "-")."""
    if split != "test":
        raise ValueError(f"only the WikiText-2 raw 'test' split is available locally, not {split!r}")
    path = data_dir("wikitext-2-raw/wiki.test.raw") / "wikitext-2-raw" / "wiki.test.raw"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line)
        if len(line) >= min_chars:
            out.append(line)
    return out


def wikitext_sentences(min_words: int = 6, max_words: int = 64) -> list[str]:
    """Sentences split from the WikiText-2 test paragraphs, length-filtered, in file order."""
    out = []
    for para in wikitext_paragraphs():
        for sent in re.split(r"(?<=[.!?]) (?=[A-Z\"])", para):
            n = len(sent.split())
            if min_words <= n <= max_words:
                out.append(sent.strip())
    return out


def ptb_lines(split: str = "test") -> list[str]:
    if split not in ("test", "valid"):
        raise ValueError(f"PTB split must be 'test' or 'valid', not {split!r}")
    path = data_dir(f"ptb/ptb.{split}.txt") / "ptb" / f"ptb.{split}.txt"
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def sst2(split: str = "train") -> list[tuple[str, int]]:
    """(sentence, label) pairs of SST-2; 'test' is GLUE's labelled dev set."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"SST-2 split must be 'train', 'dev' or 'test', not {split!r}")
    path = data_dir(f"sst2/{split}.tsv") / "sst2" / f"{split}.tsv"
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"].strip(), int(row["label"])) for row in reader]
