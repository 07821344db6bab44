"""RFC 9529 trace 1 (method 0, suite 0, X.509 by x5t) reproduced byte for byte in both roles."""

from __future__ import annotations

import pytest

from sealmq import kdf
from tests.edhoc_helpers import h, run_handshake, trace1_pair

INITIATOR_VALUES = [
    "message_1",
    "TH_2",
    "PRK_2e",
    "KEYSTREAM_2",
    "PLAINTEXT_2",
    "PRK_3e2m",
    "MAC_2",
    "TH_3",
    "PRK_4e3m",
    "MAC_3",
    "Signature_or_MAC_3",
    "PLAINTEXT_3",
    "K_3",
    "IV_3",
    "message_3",
    "TH_4",
    "PRK_out",
]
RESPONDER_VALUES = [
    "H(message_1)",
    "TH_2",
    "PRK_2e",
    "PRK_3e2m",
    "MAC_2",
    "Signature_or_MAC_2",
    "PLAINTEXT_2",
    "KEYSTREAM_2",
    "message_2",
    "TH_3",
    "PLAINTEXT_3",
    "PRK_4e3m",
    "MAC_3",
    "TH_4",
    "PRK_out",
    "K_4",
    "IV_4",
    "message_4",
]


@pytest.fixture(scope="module")
def trace_run():  # type: ignore[no-untyped-def]
    ini, res = trace1_pair()
    messages = run_handshake(ini, res)
    return ini, res, messages


@pytest.mark.parametrize("name", ["message_1", "message_2", "message_3", "message_4"])
def test_messages_byte_for_byte(trace_run, name: str) -> None:  # type: ignore[no-untyped-def]
    assert trace_run[2][name] == h(name)


@pytest.mark.parametrize("name", INITIATOR_VALUES)
def test_initiator_intermediates(trace_run, name: str) -> None:  # type: ignore[no-untyped-def]
    assert trace_run[0].transcript[name].hex() == h(name).hex()


@pytest.mark.parametrize("name", RESPONDER_VALUES)
def test_responder_intermediates(trace_run, name: str) -> None:  # type: ignore[no-untyped-def]
    assert trace_run[1].transcript[name].hex() == h(name).hex()


def test_each_role_against_the_trace_alone() -> None:
    """Each side fed only with the trace's bytes (not with our other side's output)."""
    ini, _ = trace1_pair()
    assert ini.create_message_1() == h("message_1")
    info2 = ini.process_message_2(h("message_2"))
    assert info2.c_r == h("C_R")
    assert info2.ead_2 == ()
    assert ini.create_message_3() == h("message_3")
    assert ini.process_message_4(h("message_4")) == ()
    _, res = trace1_pair()
    info1 = res.process_message_1(h("message_1"))
    assert (info1.method, info1.suite, info1.c_i) == (0, 0, h("C_I"))
    assert res.create_message_2() == h("message_2")
    res.process_message_3(h("message_3"))
    assert res.create_message_4() == h("message_4")


def test_results_exporter_and_key_update(trace_run) -> None:  # type: ignore[no-untyped-def]
    ini, res = trace_run[0], trace_run[1]
    for r in (ini.result(), res.result()):
        assert r.prk_out == h("PRK_out")
        assert kdf.prk_exporter(r.prk_out) == h("PRK_exporter")
        assert r.oscore_master_secret() == h("OSCORE_Master_Secret")
        assert r.oscore_master_salt() == h("OSCORE_Master_Salt")
        assert (r.c_i, r.c_r) == (h("Server's_OSCORE_Sender_ID"), h("Client's_OSCORE_Sender_ID"))
        assert (r.suite, r.method, r.app_aead, r.app_hash, r.hash_name) == (0, 0, 10, "sha256", "sha256")
        updated = r.key_update(h("context_for_KeyUpdate"))
        assert updated.prk_out == h("PRK_out_after_KeyUpdate")
        assert kdf.prk_exporter(updated.prk_out) == h("PRK_exporter_after_KeyUpdate")
        assert updated.oscore_master_secret() == h("OSCORE_Master_Secret_after_KeyUpdate")
        assert updated.oscore_master_salt() == h("OSCORE_Master_Salt_after_KeyUpdate")
    assert "EDHOC Initiator" in ini.result().peer.identity or "Responder" in ini.result().peer.identity
    assert "Initiator" in res.result().peer.identity


def test_signatures_match_trace(trace_run) -> None:  # type: ignore[no-untyped-def]
    assert trace_run[1].transcript["Signature_or_MAC_2"] == h("Signature_or_MAC_2")
    assert trace_run[0].transcript["Signature_or_MAC_3"] == h("Signature_or_MAC_3")


def test_transcript_is_opt_in() -> None:
    ini, res = trace1_pair(debug=False)
    run_handshake(ini, res)
    assert ini.transcript == {}
    assert res.transcript == {}
    assert ini.result().prk_out == h("PRK_out")
