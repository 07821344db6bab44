"""Our own suite-2 golden vector (tests/vectors/sealmq_edhoc_suite2.json), both directions:
encode (fixed keys -> the stored bytes; deterministic ECDSA makes signatures comparable) and
decode (each side fed only the stored bytes of the other side reaches the stored keys)."""

from __future__ import annotations

import json

import pytest

from sealmq.edhoc import EadItem
from tests.edhoc_helpers import GOLDEN, golden_pair, golden_run

DOC = json.loads(GOLDEN.read_text())
INPUTS: dict[str, str] = DOC["inputs"]
OUT = {k: bytes.fromhex(v) for k, v in DOC["outputs"].items()}


@pytest.fixture(scope="module")
def encoded() -> dict[str, str]:
    return golden_run(INPUTS)


@pytest.mark.parametrize("name", sorted(OUT))
def test_encode_gives_stored_bytes(encoded: dict[str, str], name: str) -> None:
    assert encoded[name] == OUT[name].hex()


def test_decode_stored_bytes_as_responder() -> None:
    _, res = golden_pair(INPUTS)
    info = res.process_message_1(OUT["message_1"])
    assert info.method == 0
    assert info.suite == 2
    assert info.c_i == bytes.fromhex(INPUTS["C_I"])
    assert info.ead_1 == (EadItem(1, bytes.fromhex("01020304")),)
    assert res.create_message_2() == OUT["message_2"]
    res.process_message_3(OUT["message_3"])
    result = res.result()
    assert result.prk_out == OUT["PRK_out"]
    assert result.peer.identity.name == "dev-0001"
    assert result.oscore_master_secret() == OUT["OSCORE_Master_Secret"]


def test_decode_stored_bytes_as_initiator() -> None:
    ini, _ = golden_pair(INPUTS)
    ini.create_message_1([(1, bytes.fromhex("01020304"))])
    info = ini.process_message_2(OUT["message_2"])
    assert info.c_r == bytes.fromhex(INPUTS["C_R"])
    assert info.peer.identity.name == "backend"
    assert ini.create_message_3() == OUT["message_3"]
    assert ini.process_message_4(OUT["message_4"]) == ()
    assert ini.result().prk_out == OUT["PRK_out"]
    assert ini.result().oscore_master_salt() == OUT["OSCORE_Master_Salt"]
