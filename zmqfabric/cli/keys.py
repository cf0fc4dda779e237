"""``zmqfabric keys generate|show|allow``: a node's CURVE key directory (see :mod:`zmqfabric.keys`).

DIR defaults to the global ``--keys`` (``ZMQFABRIC_KEYS``), else ``./keys``. The secret key is
written with mode 0600 and never printed; the public key is what these commands show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
import zmq.auth

from ..errors import LocalProtocolError
from ..security import keys
from .config import CliConfig, json_option, pass_config
from .output import BadInput, emit, note, warn

DEFAULT_DIR = "keys"


def _directory(cfg: CliConfig, given: str | None) -> Path:
    return Path(given or cfg.keys_dir or DEFAULT_DIR)


def _dir_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("directory", metavar="[DIR]", required=False,
                          type=click.Path(file_okay=False))(command)


@click.group("keys")
def keys_group() -> None:
    """Make and inspect a node's CURVE keys, and the allow-list of keys it trusts.

    \b
    DIR/node.key          the public key (share it)
    DIR/node.key_secret   the secret key, mode 0600 (never printed, never shared)
    DIR/allowed/*.key     public keys the node accepts; nodes sharing DIR trust each other

    DIR defaults to --keys (ZMQFABRIC_KEYS), else ./keys."""


@keys_group.command("generate")
@_dir_argument
@click.option("--force", is_flag=True,
              help="Replace an existing keypair (peers that allowed the old key refuse the new).")
@json_option
@pass_config
def generate_cmd(cfg: CliConfig, directory: str | None, force: bool) -> None:
    """Create a node keypair in DIR and print its public key."""
    path = _directory(cfg, directory)
    secret = path / f"{keys.NODE_CERT}.key_secret"
    if secret.exists() and not force:
        raise BadInput(f"{secret} exists; pass --force to replace the node's keys (peers that "
                       "allowed the old public key will refuse the new one)")
    try:
        public = keys.generate(path, force=force)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys in {path}: {exc.strerror or exc}") from exc
    if cfg.json:
        emit({"directory": str(path), "public": public, "secret_file": str(secret)})
        return
    click.echo(public)
    note(f"secret key in {secret} (mode 0600, keep it there); other key directories trust "
         f"this node after `zmqfabric keys allow {public} --label NAME DIR`")


@keys_group.command("show")
@_dir_argument
@click.option("--allowed", is_flag=True,
              help="List the allow-list (LABEL KEY per line) instead of the public key.")
@json_option
@pass_config
def show_cmd(cfg: CliConfig, directory: str | None, allowed: bool) -> None:
    """Print the public key of DIR (only the key: `KEY=$(zmqfabric keys show)` works), or with
    --allowed the keys DIR trusts. With --json, one object with both."""
    path = _directory(cfg, directory)
    public = keys.show(path)
    entries = _allowed(path)
    try:
        keys.load(path)  # what a node does with DIR: say now why it would refuse it
    except LocalProtocolError as exc:
        warn(f"a node cannot use {path}: {exc}")
    if cfg.json:
        emit({"directory": str(path), "public": public,
              "allowed": [{"label": label, "key": key} for label, key in entries]})
    elif not allowed:
        click.echo(public)
    else:
        for label, key in entries:
            click.echo(f"{label}  {key}")
        if not entries:
            note(f"{path} allows no other key (nodes sharing {path} trust each other)")


def _allowed(path: Path) -> list[tuple[str, str]]:
    """(label, key) of each allow-list entry; unreadable entries are reported, not fatal."""
    entries = []
    for cert in sorted((path / keys.ALLOWED_DIR).glob("*.key")):
        try:
            key, _ = zmq.auth.load_certificate(str(cert))
        except (OSError, ValueError) as exc:
            warn(f"bad allow-list entry {cert}: {exc}")
            continue
        entries.append((cert.stem, key.decode("ascii")))
    return entries


@keys_group.command("allow")
@click.argument("key_or_file", metavar="KEY|FILE")
@_dir_argument
@click.option("--label", required=True, metavar="NAME",
              help="Name of the entry (the file DIR/allowed/NAME.key).")
@click.option("--force", is_flag=True, help="Replace an entry of that label holding another key.")
@json_option
@pass_config
def allow_cmd(cfg: CliConfig, key_or_file: str, directory: str | None, label: str,
              force: bool) -> None:
    """Trust a public key: add KEY (Z85, 40 characters) or the public key in certificate FILE
    to DIR's allow-list under --label. Nodes started with DIR accept it from then on."""
    path = _directory(cfg, directory)
    existing = dict(_allowed(path)).get(label)
    if existing is not None and not force and _parse_key(key_or_file) != existing:
        raise BadInput(f"{path / keys.ALLOWED_DIR / (label + '.key')} holds another key "
                       f"({existing}); pass --force to replace it")
    try:
        key = keys.allow(path, key_or_file, label)
    except OSError as exc:
        raise click.ClickException(f"cannot write to {path}: {exc.strerror or exc}") from exc
    if cfg.json:
        emit({"directory": str(path), "label": label, "key": key})
    else:
        click.echo(f"allowed {label}: {key}")


def _parse_key(key_or_file: str) -> str:
    """The public key in ``key_or_file`` (as :func:`zmqfabric.keys.allow` reads it)."""
    text = key_or_file.strip()
    if keys.is_public_key(text):
        return text
    try:
        public, _ = zmq.auth.load_certificate(key_or_file)
    except (OSError, ValueError) as exc:
        raise LocalProtocolError(
            f"{key_or_file!r} is neither a Z85 public key nor a certificate file") from exc
    return public.decode("ascii")
