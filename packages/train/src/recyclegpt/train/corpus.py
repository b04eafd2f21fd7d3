"""Plain-text corpora: files, directories or globs, or the running interpreter's standard library."""

from __future__ import annotations

import glob
import random
import sysconfig
from pathlib import Path

STDLIB = "stdlib"  # the embedded default corpus: *.py files of the running interpreter


class CorpusError(ValueError):
    """A corpus path that is missing, empty or unreadable (reported as one line by the CLI)."""


def stdlib_files(seed: int = 0) -> list[Path]:
    """The standard library's *.py files in a fixed, seeded order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    random.Random(seed).shuffle(files)
    return files


def resolve(paths: list[str], seed: int = 0) -> list[Path]:
    """Expand files, directories (every file below, sorted) and globs; fail on anything unusable."""
    files: list[Path] = []
    for spec in paths:
        if spec == STDLIB:
            files.extend(stdlib_files(seed))
            continue
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise CorpusError(f"corpus glob matches no file: {spec}")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.is_file())
                if not found:
                    raise CorpusError(f"corpus directory is empty: {match}")
                files.extend(found)
            elif match.is_file():
                files.append(match)
            else:
                raise CorpusError(f"corpus path does not exist: {match}")
    return files


def read_texts(files: list[Path], max_bytes: int | None = None) -> list[str]:
    """The documents' texts, stopping once ``max_bytes`` are read (the last one is cut to fit)."""
    texts: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise CorpusError(f"cannot read corpus file {path}: {error.strerror or error}") from None
        if max_bytes is not None and total + len(text) > max_bytes:
            text = text[: max_bytes - total]
        if text.strip():
            texts.append(text)
            total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    if not texts:
        raise CorpusError(f"corpus is empty: {', '.join(str(p) for p in files[:3]) or 'no files'}")
    return texts


def check_readable(paths: list[str], seed: int = 0) -> None:
    """Fail fast (before any training starts) on a missing, empty or unreadable path."""
    files = resolve(paths, seed)
    for path in files:
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            raise CorpusError(f"cannot read corpus file {path}: {error.strerror or error}") from None
    if all(p.stat().st_size == 0 for p in files):
        raise CorpusError(f"corpus is empty: {', '.join(paths)}")


def stdlib_heldout_text(skip_bytes: int, max_bytes: int, seed: int = 0) -> str:
    """Standard-library text that a run reading ``skip_bytes`` (its ``max_corpus_bytes``) never saw.

    Files are taken in the same seeded order as training, starting after the last file it read.
    """
    read, texts, total = 0, [], 0
    for path in stdlib_files(seed):
        text = path.read_text(encoding="utf-8", errors="replace")
        if read < skip_bytes:
            read += len(text)
            continue
        texts.append(text[: max_bytes - total])
        total += len(texts[-1])
        if total >= max_bytes:
            break
    return "".join(texts)
