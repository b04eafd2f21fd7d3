"""``python -m recyclegpt.train.heldout``: write held-out text of the embedded (stdlib) corpus.

Used to evaluate a model trained on ``train_files: [stdlib]`` on code it never saw::

    python -m recyclegpt.train.heldout --skip-bytes 4000000 --bytes 300000 --out artifacts/heldout.py.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recyclegpt.train.corpus import stdlib_heldout_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write standard-library text that training did not read.")
    parser.add_argument("--skip-bytes", type=int, required=True, help="the training run's data.max_corpus_bytes")
    parser.add_argument("--bytes", type=int, default=300_000, help="characters of held-out text to write")
    parser.add_argument("--seed", type=int, default=0, help="the training run's data.seed (file order)")
    parser.add_argument("--out", required=True, help="output text file")
    args = parser.parse_args(argv)
    if args.skip_bytes < 0 or args.bytes < 1:
        sys.exit("error: --skip-bytes must be >= 0 and --bytes >= 1")
    text = stdlib_heldout_text(args.skip_bytes, args.bytes, args.seed)
    if not text:
        sys.exit(f"error: the standard library has no text beyond the first {args.skip_bytes} characters")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"held-out text: {args.out} ({len(text)} characters)")


if __name__ == "__main__":
    main()
