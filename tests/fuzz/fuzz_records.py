"""Coverage-guided fuzzing of the discovery-record decoders (atheris; not collected by pytest).

Records come from anyone on the network. :func:`zmqfabric.core.records.decode_txt` and
:func:`~zmqfabric.core.records.parse_instance` must either return a valid value or raise
:class:`~zmqfabric.errors.RemoteProtocolError`; anything else is a crash (it would escape the
discovery handler, or the control thread for hellos). A record that decodes must also survive
re-encoding: ``decode_txt(encode_txt(r)) == r`` (a node may pass on what it accepted).

Run:  python3 tests/fuzz/fuzz_records.py -max_total_time=60 [-jobs=N] [CORPUS_DIR]

Found so far: ``_int_field`` trusted ``str.isdigit()``, which is true for digits such as ``'²'``
that ``int()`` refuses (ValueError, not RemoteProtocolError); fixed by ASCII-only numbers.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import atheris

# Run as a script from anywhere: the checkout's package comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["zmqfabric"]):
    from zmqfabric.core import records
    from zmqfabric.errors import RemoteProtocolError

_VALID = {
    b"v": b"1",
    b"id": b"0123456789abcdef",
    b"host": b"host-1",
    b"pid": b"42",
    b"seq": b"3",
    b"ck": b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    b"e0": b"ctl:control:4000;rep:svc:4001;pub:ticks:4002;pull:jobs:4003",
}
_KEYS = sorted(_VALID) + [b"e1", b"e2", b"x"]
_ADDRESSES = ["127.0.0.1", "192.0.2.1", "::1", "fe80::1%lo", "224.0.0.251", "0.0.0.0", "::",
              "127.000.0.1", "1.2.3", ""]


def _text(fdp: atheris.FuzzedDataProvider, most: int) -> bytes:
    """Fuzzed TXT bytes: raw bytes, or text (any code point, so Unicode digits and case)."""
    style = fdp.ConsumeIntInRange(0, 3)
    if style == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, most))
    if style == 1:  # mostly ASCII digits and separators: reaches the number and list parsers
        alphabet = "0123456789:;abcdef-_.²٣ "
        return "".join(alphabet[fdp.ConsumeIntInRange(0, len(alphabet) - 1)]
                       for _ in range(fdp.ConsumeIntInRange(0, min(most, 24)))).encode("utf-8")
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, most)).encode("utf-8")


def _properties(fdp: atheris.FuzzedDataProvider) -> dict[bytes, bytes | None]:
    """A valid record with some fields replaced, removed or added."""
    props: dict[bytes, bytes | None] = dict(_VALID) if fdp.ConsumeBool() else {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        op = fdp.ConsumeIntInRange(0, 7)
        key = _KEYS[fdp.ConsumeIntInRange(0, len(_KEYS) - 1)] if op < 7 else _text(fdp, 8)
        if op == 0:
            props.pop(key, None)
        elif op == 1:
            props[key] = None if fdp.ConsumeBool() else b""
        elif op == 3 and key.startswith(b"e"):  # many valid endpoints: list and size limits
            items = [f"rep:s{i}:{1 + i}" for i in range(fdp.ConsumeIntInRange(0, 140))]
            for index in range(0, len(items), 20):  # 20 short items fit one TXT value
                props[f"e{index // 20}".encode()] = ";".join(items[index:index + 20]).encode()
        elif op == 2 and key.startswith(b"e"):  # an endpoint list of fuzzed items
            items = [b":".join(_text(fdp, 12) for _ in range(fdp.ConsumeIntInRange(1, 4)))
                     for _ in range(fdp.ConsumeIntInRange(0, 40))]
            props[key] = b";".join(items)
        else:
            props[key] = _text(fdp, 300)
    return props


def _instance(fdp: atheris.FuzzedDataProvider) -> str:
    """A DNS-SD instance name: free text, or ``<text>@<id-like text>`` with the service type."""
    name = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 70))
    if fdp.ConsumeBool():
        return name + (records.SERVICE_TYPE if fdp.ConsumeBool() else "")
    hexdigits = "0123456789abcdefA"
    length = fdp.ConsumeIntInRange(0, 20) if fdp.ConsumeIntInRange(0, 3) == 3 else 16
    node_id = "".join(hexdigits[fdp.ConsumeIntInRange(0, len(hexdigits) - 1)]
                      for _ in range(length))
    suffix = records.SERVICE_TYPE if fdp.ConsumeIntInRange(0, 7) else records.SERVICE_TYPE.upper()
    return f"{name}@{node_id}.{suffix}"


def _addresses(fdp: atheris.FuzzedDataProvider) -> list[str]:
    out = []
    for _ in range((1, 1, 2, 0)[fdp.ConsumeIntInRange(0, 3)]):
        if fdp.ConsumeIntInRange(0, 3):
            out.append(_ADDRESSES[fdp.ConsumeIntInRange(0, len(_ADDRESSES) - 1)])
        else:
            out.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 48)))
    return out


def _check_record(record: records.NodeRecord) -> None:
    assert len(record.endpoints) <= records.MAX_ENDPOINTS, record
    assert all(1 <= ep.port <= 65535 for ep in record.endpoints), record
    ip = ipaddress.ip_address(record.address)
    assert not ip.is_multicast and not ip.is_unspecified, record
    again = records.decode_txt(record.name, [record.address],
                               {k.encode(): v.encode() for k, v in
                                records.encode_txt(record).items()})
    assert again == record, (record, again)


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    try:
        if fdp.ConsumeIntInRange(0, 3) == 0:
            instance = _instance(fdp)
            name, node_id = records.parse_instance(instance)
            assert records.parse_instance(records.instance_name(name, node_id)) == (name, node_id)
        else:
            node = "n" if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(10)
            addresses = _addresses(fdp)
            _check_record(records.decode_txt(node, addresses, _properties(fdp)))
    except RemoteProtocolError:
        pass  # refused: the one allowed failure


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
