"""The shipped text corpus behind ``data.source=corpus``: public-domain US texts plus generated English-like text.

See README.md in this folder for the provenance of every text. The generated part is produced at load time
from a fixed seed (:mod:`.generator`), so nothing large is committed and the corpus is identical everywhere.
"""

from __future__ import annotations

from importlib import resources

from sparsetron.train.corpus.generator import generate_documents

GENERATED_SEED = 1787
"""Seed of the generated part; changing it changes the corpus (stores record a digest and refuse to mix)."""
GENERATED_CHARS = 320_000
"""Characters of generated text (about 85 documents), enough for a tiny model to show a falling loss."""


def public_domain_texts() -> dict[str, str]:
    """The shipped texts as ``{file name: text}``, in file-name order (UTF-8 files under ``texts/``)."""
    folder = resources.files(__name__) / "texts"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    return {f.name: f.read_text(encoding="utf-8") for f in files}


def corpus_documents() -> list[str]:
    """Every corpus document, one string each: the public-domain texts, then the generated documents."""
    return [*public_domain_texts().values(), *generate_documents(GENERATED_SEED, GENERATED_CHARS)]
