"""CURVE keys: a node's keypair and the allow-list of public keys it trusts.

A key directory holds files in ZeroMQ's certificate format (``zmq.auth``)::

    DIR/node.key            public key (share it)
    DIR/node.key_secret     public + secret key, mode 0600 (never printed, never shared)
    DIR/allowed/*.key       public keys this node accepts, one certificate each

The node's own public key is always allowed, so nodes that share one key directory trust each
other. Public keys are shown and exchanged in Z85 (40 characters).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq.auth

from ..core.curve import KeySet, is_public_key
from ..errors import LocalProtocolError

__all__ = ["KeySet", "is_public_key", "generate", "load", "show", "allow"]

NODE_CERT = "node"
ALLOWED_DIR = "allowed"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def generate(directory: str | os.PathLike[str], *, force: bool = False) -> str:
    """Create a node keypair in ``directory``; return the public key (Z85).

    Raises LocalProtocolError if a keypair exists (unless ``force``)."""
    path = Path(directory)
    secret = path / f"{NODE_CERT}.key_secret"
    if secret.exists() and not force:
        raise LocalProtocolError(f"{secret} exists; pass force to replace the node's keys")
    path.mkdir(parents=True, exist_ok=True)
    (path / ALLOWED_DIR).mkdir(exist_ok=True)
    old_umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(path), NODE_CERT)
    finally:
        os.umask(old_umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    public, _ = zmq.auth.load_certificate(public_file)
    return public.decode("ascii")


def show(directory: str | os.PathLike[str]) -> str:
    """The node's public key (Z85). Raises LocalProtocolError if there is none."""
    public_file = Path(directory) / f"{NODE_CERT}.key"
    try:
        public, _ = zmq.auth.load_certificate(str(public_file))
    except (OSError, ValueError) as exc:
        raise LocalProtocolError(
            f"no node key in {directory}: run `zmqfabric keys generate {directory}`"
        ) from exc
    return public.decode("ascii")


def allow(directory: str | os.PathLike[str], key_or_file: str, label: str) -> str:
    """Add a public key (Z85 text, or a certificate file) to the allow-list under ``label``.

    Returns the key. Raises LocalProtocolError for a bad key or label."""
    if not _LABEL.match(label):
        raise LocalProtocolError(f"label {label!r}: use letters, digits, '.', '-' or '_'")
    key = key_or_file.strip()
    if not is_public_key(key):
        try:
            public, _ = zmq.auth.load_certificate(key_or_file)
            key = public.decode("ascii")
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise LocalProtocolError(
                f"{key_or_file!r} is neither a Z85 public key nor a certificate file"
            ) from exc
        if not is_public_key(key):
            raise LocalProtocolError(
                f"certificate {key_or_file!r} holds no valid public key ({key[:48]!r})"
            )
    target = Path(directory) / ALLOWED_DIR / f"{label}.key"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "#   ZeroMQ CURVE public key, allowed by zmqfabric\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{key}"\n',
        encoding="ascii",
    )
    return key


def load(directory: str | os.PathLike[str]) -> KeySet:
    """Load a key directory. Raises LocalProtocolError with what is missing or wrong."""
    path = Path(directory)
    secret_file = path / f"{NODE_CERT}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise LocalProtocolError(
            f"cannot read the node's secret key {secret_file}: {exc}; "
            f"create one with `zmqfabric keys generate {directory}`"
        ) from exc
    if secret is None:
        raise LocalProtocolError(f"{secret_file} holds no secret key")
    try:
        matches = zmq.curve_public(secret) == public
    except (zmq.ZMQError, ValueError) as exc:
        raise LocalProtocolError(f"{secret_file}: the secret key is not a Z85 CURVE key") from exc
    if not matches:
        raise LocalProtocolError(
            f"{secret_file}: the secret key does not belong to its public key; "
            f"regenerate with `zmqfabric keys generate --force {directory}`"
        )
    mode = secret_file.stat().st_mode & 0o077
    if mode:
        raise LocalProtocolError(
            f"{secret_file} is readable by others (mode {oct(secret_file.stat().st_mode & 0o777)})"
            f"; run `chmod 600 {secret_file}`"
        )
    allowed: set[str] = set()
    allowed_dir = path / ALLOWED_DIR
    if allowed_dir.is_dir():
        for cert in sorted(allowed_dir.glob("*.key")):
            try:
                key, _ = zmq.auth.load_certificate(str(cert))
            except (OSError, ValueError) as exc:
                raise LocalProtocolError(f"bad allow-list entry {cert}: {exc}") from exc
            text = key.decode("ascii", "replace")
            if not is_public_key(text):
                raise LocalProtocolError(f"bad allow-list entry {cert}: {text[:48]!r} is not a key")
            allowed.add(text)
    return KeySet(public.decode("ascii"), secret.decode("ascii"), frozenset(allowed), str(path))
