"""Size limits on what an input file or option may make us allocate, in one place.

Every limit protects against a number an attacker (or a typo) chooses: an image of 64 megapixels, a
`--short-edge 100000`, `--num-classes 50000`. Each has a default that fits a 24 GiB machine with room to
spare and an environment variable that raises (or lowers) it, read at each check:

    MASK2FORMER_MAX_IMAGE_PIXELS   images read for prediction or scoring (default 50 000 000 = 50 MP)
    MASK2FORMER_MAX_INPUT_PIXELS   the network's input H x W: --short-edge, export/bench --size (16.8 MP)
    MASK2FORMER_MAX_CLASSES        classes of a semantic evaluation or a model config (default 4096)
    MASK2FORMER_MAX_PICTURE_SIDE   longest side an overlay picture is enlarged to (default 4096)

A value over its limit raises `LimitError` (a ValueError) whose one line names the value, the limit and
the variable to set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_PREFIX = "MASK2FORMER_MAX_"


@dataclass(frozen=True)
class Limit:
    name: str  # the suffix of the environment variable
    default: int
    what: str  # "image pixels", ...

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name

    def value(self) -> int:
        """The limit in force: the environment variable when set to a positive integer, else the default."""
        text = os.environ.get(self.variable, "").strip().replace("_", "")
        if text.isdigit() and int(text) > 0:
            return int(text)
        return self.default

    def check(self, amount: int, subject: str) -> None:
        """Raise LimitError when `amount` is over the limit; `subject` starts the message (a file, a flag)."""
        limit = self.value()
        if amount > limit:
            raise LimitError(
                f"{subject}: {amount:,} {self.what} is over the limit of {limit:,} "
                f"(set {self.variable} to raise it)"
            )


class LimitError(ValueError):
    """An input over one of the limits (one line naming the value and how to raise the limit)."""


IMAGE_PIXELS = Limit("IMAGE_PIXELS", 50_000_000, "image pixels")
INPUT_PIXELS = Limit("INPUT_PIXELS", 4096 * 4096, "network input pixels")
CLASSES = Limit("CLASSES", 4096, "classes")
PICTURE_SIDE = Limit("PICTURE_SIDE", 4096, "picture pixels on a side")

ALL = (IMAGE_PIXELS, INPUT_PIXELS, CLASSES, PICTURE_SIDE)
