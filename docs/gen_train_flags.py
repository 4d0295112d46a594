"""Write the table of `stylenat train`'s options into docs/training.md, between its marker comments.

    python docs/gen_train_flags.py

The table comes from stylenat.train.flags.train_flags_markdown (flags, types and help from TrainConfig's
fields); tests/test_cli_train_flags.py fails when the committed table differs from it.
"""

from __future__ import annotations

import re
from pathlib import Path

from stylenat.train.flags import train_flags_markdown

PAGE = Path(__file__).parent / "training.md"
START = "<!-- train-flags:start (written by docs/gen_train_flags.py; do not edit by hand) -->"
END = "<!-- train-flags:end -->"


def updated(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    block = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if len(block.findall(text)) != 1:
        raise SystemExit(f"{PAGE} needs the markers once each, in this order:\n{START}\n{END}")
    return block.sub(lambda _: f"{START}\n{train_flags_markdown()}{END}", text)


if __name__ == "__main__":
    PAGE.write_text(updated(PAGE.read_text()))
    print(f"wrote the train flag table into {PAGE}")
