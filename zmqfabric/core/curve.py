"""CURVE keys as values: a node's keypair with its allow-list, and the Z85 key syntax. Pure: the
files they come from are :mod:`zmqfabric.security.keys`'s business."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

#: A CURVE public key in Z85: 40 characters of ZeroMQ's Z85 alphabet.
Z85_KEY: Final = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}\Z")


@dataclass(frozen=True, slots=True)
class KeySet:
    """A node's CURVE keypair (Z85) and the public keys it allows (itself included)."""

    public: str
    secret: str = field(repr=False)
    allowed: frozenset[str]
    directory: str = ""

    def allows(self, public_key: str) -> bool:
        return public_key == self.public or public_key in self.allowed


def is_public_key(text: str) -> bool:
    return bool(Z85_KEY.match(text))
