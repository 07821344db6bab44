"""Enrolment and update messages (issue 16) against docs/protocol.md's CDDL, and their codecs
(``sealmq/enrol.py``, ``sealmq/update.py``) under garbage and mutation.

The messages are the ones the real device and backend code make in a real run (zero-touch
enrolment, a renewal, an installed update and a refused one over the embedded broker), captured as
they are sealed; every rule of sections 7.2/7.3 must accept them, and their mutations must be refused
by the schema and by the codecs alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from pki import claim, layout, release
from sealmq import cbor, enrol, update
from sealmq.errors import FleetError, LocalProtocolError, Reason
from sealmq.topics import RecordKind
from tests.cddl import CddlError, Schema
from tests.e2e import Recorder, System, wait_for
from tests.test_protocol_cddl import BODY_RULE, FLEET_KINDS, Capture, _invalid_variants, check_publish, spying
from tests.test_protocol_cddl import schema as schema  # noqa: PLC0414 - the module fixture

DECODERS = {
    RecordKind.ENROL_REQUEST: enrol.decode_request,
    RecordKind.ENROL_RESPONSE: enrol.decode_response,
    RecordKind.UPDATE_OFFER: update.decode_offer,
    RecordKind.UPDATE_CHUNK: update.decode_chunk,
    RecordKind.UPDATE_STATUS: update.decode_status,
}


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Capture, list[tuple[str, bytes]]]:
    from backend.enrol import EnrolPolicy
    from device.enrol import EnrolConfig
    from device.enrol import enrol as enrol_device

    root = tmp_path_factory.mktemp("fleet")
    with spying() as cap:
        system = System(root, ["cam-1"], broker="amqtt")
        try:
            recorder = Recorder(system)
            d = layout.device_dir(system.dep.pki, "cam-1")
            for name in (layout.KEY, layout.CERT, layout.CHAIN):
                (d / name).unlink()
            keys_dir = root / "offline"
            release.init_release_key(keys_dir)
            claim.issue_claim(system.dep.pki, "cam-1", release_pub=keys_dir / release.RELEASE_PUB)
            backend = system.start_backend()
            backend.enrolment.policy = EnrolPolicy(renew_after=0.0)
            enrol_device(EnrolConfig(device_id="cam-1", claim_dir=claim.claim_dir(system.dep.pki, "cam-1"),
                                     pki_dir=system.dep.pki, identity_dir=d, state_dir=system.dep.device_state("cam-1"),
                                     mqtt=system.mqtt("device", "cam-1", client_id="cam-1:enrol"), poll_interval=0.05))
            agent = system.agent("cam-1")
            renewer = agent.renewer
            assert renewer is not None
            renewer.due_at = lambda: 0.0  # type: ignore[method-assign]  # renew now: one request, one answer
            assert wait_for(lambda: any(e["event"] == "certificate_superseded" for e in system.audit()))
            renewer.due_at = lambda: 1e18  # type: ignore[method-assign]
            fw = root / "fw.bin"
            fw.write_bytes(os.urandom(40_000))
            for version in (2, 1):  # installed, then refused as a downgrade
                pkg = root / f"fw{version}.pkg"
                release.sign_package(keys_dir, fw, pkg, version=version, kind="firmware", devices=("cam-1",))
                from backend.update import push

                push(system.dep.backend_data, "cam-1", pkg)
                event = "update_installed" if version == 2 else "update_rejected"
                assert wait_for(lambda e=event: any(x["event"] == e for x in system.audit()), timeout=20)
            wait_for(lambda: False, timeout=0.3)
            relayed = recorder.snapshot()
            recorder.stop()
        finally:
            system.close()
    return cap, relayed


def test_fleet_messages_match_the_docs(schema: Schema, fleet_run: tuple[Capture, list[tuple[str, bytes]]]) -> None:
    cap, relayed = fleet_run
    for topic, payload in relayed:
        check_publish(schema, topic, payload)
    fleet = [(k, p) for k, p in cap.sealed if k in FLEET_KINDS]
    assert {k for k, _ in fleet} == FLEET_KINDS
    states = set()
    for kind, plaintext in fleet:
        value = schema.validate_cbor(plaintext, BODY_RULE[kind])
        DECODERS[kind](plaintext)  # the codec accepts what the code sends
        for bad in _invalid_variants(value):
            assert not schema.matches(bad, BODY_RULE[kind]), (kind, bad)
            with pytest.raises(FleetError):
                DECODERS[kind](cbor.dumps(bad))
        if kind is RecordKind.UPDATE_STATUS:
            states.add(value[1])
        if kind is RecordKind.UPDATE_OFFER:
            signed = cbor.loads(value[1])
            schema.validate(signed, "update-signed-manifest")
            schema.validate_cbor(signed[0], "update-protected")
            manifest = schema.validate_cbor(signed[2], "update-manifest")
            for bad in _invalid_variants(manifest):
                assert not schema.matches(bad, "update-manifest"), bad
    assert states == {0, 1, 2}  # need, installed, rejected
    responses = [cbor.loads(p) for k, p in fleet if k is RecordKind.ENROL_RESPONSE]
    assert len(responses) >= 2 and all(r[1] is True for r in responses)  # enrolment and renewal(s)


def test_the_refusal_alternative_matches_the_docs(schema: Schema) -> None:
    body = enrol.EnrolResponse.refused(7, Reason.CLAIM_EXHAUSTED.value).encode()
    schema.validate_cbor(body, "enrol-response")
    assert enrol.decode_response(body).reason == "claim_exhausted"


# --- codecs: round trips, local refusals, garbage and mutations --------------------------------

def _signed(key: Any = None, **kw: Any) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    fields: dict[str, Any] = {"version": 3, "kind": "firmware", "digest": hashlib.sha256(b"x").digest(), "size": 1,
                              "devices": ("cam-1",)}
    fields.update(kw)
    return update.sign_manifest(key, update.UpdateManifest(**fields))


def test_codec_round_trips() -> None:
    req = enrol.EnrolRequest(5, b"\x30" * 300)
    assert enrol.decode_request(req.encode()) == req
    resp = enrol.EnrolResponse.issued(5, [b"a" * 10, b"b"])
    assert enrol.decode_response(resp.encode()) == resp
    signed = _signed()
    offer = update.Offer(update.transfer_id(signed), signed, 1024)
    assert update.decode_offer(offer.encode()) == offer
    chunk = update.UpdateChunk(offer.tid, 3, b"data")
    assert update.decode_chunk(chunk.encode()) == chunk
    status = update.Status(offer.tid, update.UpdateState.REJECTED, 0, "downgrade")
    assert update.decode_status(status.encode()) == status
    assert "data" not in repr(chunk) and "\\x30" not in repr(req)  # no payload in logs


def test_local_refusals() -> None:
    with pytest.raises(LocalProtocolError):
        enrol.EnrolRequest(-1, b"x").encode()
    with pytest.raises(LocalProtocolError):
        enrol.EnrolResponse(1, True, ()).encode()
    with pytest.raises(LocalProtocolError):  # a target of both kinds
        update.UpdateManifest(1, "firmware", bytes(32), 1, device_class="c", devices=("a",)).to_cbor()
    with pytest.raises(LocalProtocolError):
        update.UpdateManifest(1, "rootkit", bytes(32), 1, device_class="c").to_cbor()


def test_acceptance_rules() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    ok = _signed(key)
    accepted = update.accept_manifest(ok, pub, device_id="cam-1", device_class=None, installed_version=2)
    assert accepted.manifest.version == 3
    cases = [
        (ok, "cam-2", None, 2, Reason.WRONG_TARGET),
        (ok, "cam-1", None, 3, Reason.DOWNGRADE),
        (_signed(key, devices=(), device_class="cam-v2"), "cam-1", "cam-v1", 0, Reason.WRONG_TARGET),
        (_signed(key, devices=(), device_class="cam-v2"), "cam-1", None, 0, Reason.WRONG_TARGET),
        (_signed(), "cam-1", None, 0, Reason.BAD_SIGNATURE),  # another key
    ]
    for data, device, cls, installed, reason in cases:
        with pytest.raises(FleetError) as exc:
            update.accept_manifest(data, pub, device_id=device, device_class=cls, installed_version=installed)
        assert exc.value.reason is reason
    # a flipped bit anywhere in the signed manifest: never accepted
    for i in range(len(ok)):
        bad = bytearray(ok)
        bad[i] ^= 0x01
        with pytest.raises(FleetError):
            update.accept_manifest(bytes(bad), pub, device_id="cam-1", device_class=None, installed_version=0)
    # a package whose payload was truncated or changed
    pkg = update.encode_package(_signed(key, digest=hashlib.sha256(b"abcd").digest(), size=4), b"abcd")
    update.decode_package(pkg)
    for payload in (b"abc", b"abcx", b"abcde"):
        signed = cbor.loads(pkg)[0]
        with pytest.raises(FleetError) as exc:
            update.decode_package(update.encode_package(signed, payload))
        assert exc.value.reason is Reason.HASH_MISMATCH


ALL_DECODERS = [*DECODERS.values(), update.decode_manifest, update.parse_signed_manifest, update.decode_package]


@given(st.binary(max_size=300))
def test_garbage_gets_a_typed_error(data: bytes) -> None:
    for decode in ALL_DECODERS:
        with contextlib.suppress(FleetError):
            decode(data)


VALID = [
    enrol.EnrolRequest(1, b"csr").encode(),
    enrol.EnrolResponse.issued(2, [b"c"]).encode(),
    enrol.EnrolResponse.refused(3, "revoked").encode(),
    update.Status(bytes(16), update.UpdateState.NEED, 4, "").encode(),
    update.UpdateChunk(bytes(16), 1, b"zz").encode(),
]


@given(st.sampled_from(range(len(VALID))), st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_mutated_bodies_decode_or_get_a_typed_error(which: int, pos: int, value: int) -> None:
    data = bytearray(VALID[which])
    data[pos % len(data)] = value
    for decode in ALL_DECODERS:
        with contextlib.suppress(FleetError):
            decode(bytes(data))


def test_schema_refuses_wrong_values(schema: Schema) -> None:
    tid = bytes(16)
    for bad in ([tid, 3, 0, ""], [tid[:15], 0, 0, ""], [tid, 0, -1, ""], [tid, 0, 0, "x" * 65]):
        with pytest.raises(CddlError):
            schema.validate(bad, "update-status")
        with pytest.raises(FleetError):
            update.decode_status(cbor.dumps(bad))
    with pytest.raises(CddlError):
        schema.validate([1, True, []], "enrol-response")
    with pytest.raises(FleetError):
        enrol.decode_response(cbor.dumps([1, True, []]))
