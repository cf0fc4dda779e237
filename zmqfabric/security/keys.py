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

    The key directory (and ``allowed/``) is mode 0700 and the secret file 0600 from its first
    byte, whatever the umask: each file is written under a temporary name created 0600 (0644 for
    the public key), then renamed over the old one, so even ``force`` never writes a secret into
    a file that others can read. Raises LocalProtocolError if a keypair exists (unless
    ``force``), OSError when the files cannot be written."""
    path = Path(directory)
    secret = path / f"{NODE_CERT}.key_secret"
    if secret.exists() and not force:
        raise LocalProtocolError(f"{secret} exists; pass force to replace the node's keys")
    private_dir(path)
    private_dir(path / ALLOWED_DIR)
    public, secret_key = (k.decode("ascii") for k in zmq.curve_keypair())
    _write_cert(secret, _SECRET_BANNER, public, secret_key, 0o600)
    _write_cert(path / f"{NODE_CERT}.key", _PUBLIC_BANNER, public, None, 0o644)
    return public


def private_dir(path: Path) -> None:
    """Make ``path`` (and its parents) if needed, and make it mode 0700 whatever the umask."""
    old_umask = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o700)


_PUBLIC_BANNER = ("#   ZeroMQ CURVE Public Certificate (zmqfabric)\n"
                  "#   Share it: peers allow it.\n\n")
_SECRET_BANNER = ("#   ZeroMQ CURVE **Secret** Certificate (zmqfabric)\n"
                  "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n")


def _write_cert(target: Path, banner: str, public: str, secret: str | None, mode: int) -> None:
    """Write a certificate in ZeroMQ's format (``zmq.auth.load_certificate`` reads it) to a new
    file of ``mode`` beside ``target``, then rename it over ``target``."""
    text = f'{banner}metadata\ncurve\n    public-key = "{public}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret}"\n'
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; it never adds any
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, target)


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
    private_dir(target.parent)
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
