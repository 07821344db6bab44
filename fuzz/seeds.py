"""Writes the seed corpus ``fuzz/corpus/<target>/seed-*``: ``python3 -m fuzz.seeds``.

Seeds are real, valid messages: the RFC 9529 trace 1 and 2 messages and plaintexts, the golden
vectors of ``tests/vectors`` (EDHOC suite 2, records), and the messages this code produces in a
world built for the purpose (see :mod:`fuzz.world`; each worker process adds its own world's
messages to its working corpus too, since certificates and keys are made afresh per process).
Existing seed files are replaced; inputs added by ``python3 -m fuzz --merge`` are kept.
"""

from __future__ import annotations

import hashlib
import sys

from fuzz import targets, world
from fuzz.run import CORPUS
from sealmq import cbor


def _hex(values: dict[str, str], *names: str) -> list[bytes]:
    return [bytes.fromhex(values[n]) for n in names if n in values]


def vector_seeds() -> dict[str, list[bytes]]:
    t1 = world.vector("rfc9529_trace1.json")["values"]
    t2 = world.vector("rfc9529_trace2.json")["values"]
    golden = world.vector("sealmq_edhoc_suite2.json")["outputs"]
    records = [bytes.fromhex(v["output"]["record"]) for v in world.vector("sealmq_records.json")["vectors"]]
    messages = {n: _hex(t1, n) + _hex(t2, n) + _hex(golden, n) for n in ("message_1", "message_2", "message_3",
                                                                          "message_4")}
    error = _hex(t2, "error.error")
    frames = [b"\xf5" + m for m in messages["message_1"]] + [b"\x27" + m for m in messages["message_3"]]
    return {
        "cbor": [*records, *messages["message_1"], *messages["message_2"]],
        "record": records,
        # byte 0 = 0: the backend receives on data/up; 0x40: the device receives on data/down
        "session": [bytes([0]) + records[0], bytes([0x40]) + records[1], bytes([1]) + records[2]],
        "hs_framing": frames + [b"\xf6" + e for e in error],
        "edhoc_message_1": messages["message_1"] + _hex(t2, "first_time.message_1"),
        "edhoc_message_2": messages["message_2"],
        "edhoc_plaintext_2": _hex(t1, "PLAINTEXT_2") + _hex(t2, "PLAINTEXT_2"),
        "edhoc_message_3": messages["message_3"],
        "edhoc_plaintext_3": _hex(t1, "PLAINTEXT_3") + _hex(t2, "PLAINTEXT_3"),
        "edhoc_message_4": [b"\x00" + m for m in messages["message_4"]],
        "edhoc_error": [bytes([i]) + e for e in error for i in range(3)],
        "id_cred": [cbor.dumps(cbor.loads(x)) for x in _hex(t1, "ID_CRED_R", "ID_CRED_I")]
        + _hex(t2, "ID_CRED_R", "ID_CRED_I"),
        "ccs": _hex(t2, "CRED_R_cbor", "CRED_I_cbor"),
        "backend_endpoint": [bytes([0]) + f for f in frames],
    }


def main() -> int:
    seeds: dict[str, list[bytes]] = {name: [] for name in targets.TARGETS}
    for name, items in vector_seeds().items():
        seeds[name].extend(items)
    for name, t in targets.TARGETS.items():
        seeds[name].extend(t.seeds())
    try:
        for name, items in seeds.items():
            d = CORPUS / name
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("seed-*"):
                old.unlink()
            for item in items:
                (d / ("seed-" + hashlib.sha1(item).hexdigest())).write_bytes(item)
            print(f"{name:<18} {len(items)} seeds", file=sys.stderr)
    finally:
        world.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
