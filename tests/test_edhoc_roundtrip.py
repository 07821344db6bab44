"""EDHOC round trips between our two roles with real certificates from ``pki.issue`` and the real
``pki.verify.TrustStore``: suites 2 and -24 (RSA-PSS) by x5chain and x5t, plus the other suites
we implement, EAD pass-through and cipher-suite negotiation."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sealmq import cbor
from sealmq.edhoc import (
    AuthenticatedPeer,
    EadItem,
    IdCred,
    Initiator,
    Responder,
    State,
    X509Credential,
    encode_error,
    generate_ephemeral,
)
from sealmq.errors import EdhocError, LocalProtocolError, Reason
from sealmq.identity import Role
from tests.edhoc_helpers import PkiFixture, counter_random, make_pki, p256_key, rsa_key, run_handshake


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_pki()


def keypair(kind: str, seed: int) -> Any:
    if kind == "p256":
        return p256_key(seed)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(counter_random(seed)(32))
    return rsa_key(seed)


def make_pair(
    pki: PkiFixture,
    kind: str,
    suites: list[int],
    *,
    by_reference: bool,
    responder_suites: list[int] | None = None,
    seed: int = 0,
) -> tuple[Initiator, Responder]:
    dev_key, be_key = keypair(kind, 10 + seed), keypair(kind, 20 + seed)
    dev_chain = pki.leaf(Role.DEVICE, "dev-7", dev_key)
    be_chain = pki.leaf(Role.BACKEND, "backend", be_key)
    rnd = counter_random(1000 + seed)
    ini = Initiator(
        X509Credential(dev_key, dev_chain, by_reference=by_reference),
        pki.authenticator(Role.BACKEND, known=[be_chain]),
        c_i=-3,
        suites=suites,
        random_bytes=rnd,
    )
    res = Responder(
        [X509Credential(be_key, be_chain, by_reference=by_reference)],
        pki.authenticator(Role.DEVICE, known=[dev_chain]),
        c_r=b"\x99\x01",
        suites=responder_suites or suites,
        random_bytes=rnd,
    )
    return ini, res


@pytest.mark.parametrize("by_reference", [False, True], ids=["x5chain", "x5t"])
@pytest.mark.parametrize(
    ("kind", "suite"), [("p256", 2), ("rsa", -24), ("ed25519", 0), ("p256", 3), ("p256", 6), ("ed25519", 1)]
)
def test_round_trip(pki: PkiFixture, kind: str, suite: int, by_reference: bool) -> None:
    ini, res = make_pair(pki, kind, [suite], by_reference=by_reference)
    msgs = run_handshake(ini, res)
    a, b = ini.result(), res.result()
    assert a.prk_out == b.prk_out
    assert len(a.prk_out) == 32
    assert a.suite == b.suite == suite
    assert (a.c_i, a.c_r) == (b.c_i, b.c_r) == (cbor.dumps(-3), b"\x99\x01")
    assert a.peer.identity.name == "backend"
    assert a.peer.identity.role is Role.BACKEND
    assert b.peer.identity.name == "dev-7"
    assert b.peer.identity.role is Role.DEVICE
    assert a.exporter(0, b"", 16) == b.exporter(0, b"", 16)
    assert ini.state is State.CONFIRMED
    assert res.state is State.CONFIRMED
    id_cred_i_compact_len = 14 if by_reference else 100
    assert len(msgs["message_3"]) > id_cred_i_compact_len  # x5chain carries the certificates
    if kind == "rsa":
        assert len(msgs["message_2"]) > 256 + 32  # a 2048-bit PSS signature is in it


def test_suite_24_p384() -> None:
    """Suite 24 (P-384, ES384, A256GCM, SHA-384) with a credential the test vouches for itself."""
    keys = [
        ec.derive_private_key(int.from_bytes(counter_random(s)(48), "big") % (2**380), ec.SECP384R1())
        for s in (1, 2)
    ]

    class Raw:
        def __init__(self, key: Any) -> None:
            self.key = key
            self.id_cred = IdCred.kid(b"\x01" if key is keys[0] else b"\x02")
            self.cred = cbor.dumps({1: 2})  # an opaque CBOR item is enough here
            from sealmq.edhoc import AuthKind

            self.kind = AuthKind.SIGNATURE

        def supports(self, suite: Any) -> bool:
            return bool(suite.signature_key_matches(self.key))

        def sign(self, suite: Any, message: bytes) -> bytes:
            return bytes(suite.sign(self.key, message))

        def static_dh(self, suite: Any, peer_public: bytes) -> bytes:
            raise AssertionError

    class ByKid:
        def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
            key = keys[0] if id_cred.get_kid() == b"\x01" else keys[1]
            return AuthenticatedPeer(cbor.dumps({1: 2}), key.public_key(), id_cred.get_kid())

    rnd = counter_random(7)
    ini = Initiator(Raw(keys[0]), ByKid(), c_i=b"\x01\x02", suites=[24], random_bytes=rnd)
    res = Responder(Raw(keys[1]), ByKid(), c_r=5, suites=[24], random_bytes=rnd)
    msgs = run_handshake(ini, res)
    assert ini.result().prk_out == res.result().prk_out
    assert len(ini.result().prk_out) == 48
    assert ini.result().hash_name == "sha384"
    assert ini.result().app_aead == 3
    assert res.result().peer.identity == b"\x01"
    assert ini.result().peer.identity == b"\x02"
    assert cbor.loads_seq(msgs["message_1"])[1] == 24


def test_ead_passed_through_and_padding_dropped(pki: PkiFixture) -> None:
    ini, res = make_pair(pki, "p256", [2], by_reference=True)
    res.known_ead_labels = frozenset({5})
    ini.known_ead_labels = frozenset({5})
    i1 = res.process_message_1(ini.create_message_1([EadItem(-5, b"crit"), (7, None), (0, b"\x00" * 4)]))
    assert i1.ead_1 == (EadItem(-5, b"crit"), EadItem(7, None))
    i2 = ini.process_message_2(res.create_message_2([(9, b"two")]))
    assert i2.ead_2 == (EadItem(9, b"two"),)
    i3 = res.process_message_3(ini.create_message_3([(-5, b"three")]))
    assert i3.ead_3 == (EadItem(-5, b"three"),)
    assert ini.process_message_4(res.create_message_4([(11, None)])) == (EadItem(11, None),)
    assert res.result().ead[1] == i1.ead_1
    assert res.result().ead[3] == i3.ead_3
    assert ini.result().ead[2] == i2.ead_2
    assert ini.result().ead[4] == (EadItem(11, None),)


def test_negotiation_like_trace_2(pki: PkiFixture) -> None:
    """I prefers 6, R only does 2: error (ERR_CODE 2, SUITES_R 2), then SUITES_I [6, 2] succeeds."""
    ini, res = make_pair(pki, "p256", [6, 2], by_reference=True, responder_suites=[2])
    m1 = ini.create_message_1()
    assert cbor.loads_seq(m1)[1] == 6
    with pytest.raises(EdhocError) as info:
        res.process_message_1(m1)
    assert info.value.reason is Reason.UNSUPPORTED_SUITE
    assert info.value.err_code == 2
    err_msg = encode_error(info.value)
    assert err_msg == bytes.fromhex("0202")  # as in RFC 9529 trace 2
    m1b = ini.process_error(err_msg)
    assert cbor.loads_seq(m1b)[1] == [6, 2]
    assert cbor.loads_seq(m1b)[2] != cbor.loads_seq(m1)[2]  # a fresh ephemeral key
    res2 = Responder(
        res.credentials, res.authenticator, c_r=b"\x99\x01", suites=[2], random_bytes=counter_random(9)
    )
    res2.process_message_1(m1b)
    ini.process_message_2(res2.create_message_2())
    res2.process_message_3(ini.create_message_3())
    assert ini.result().suite == res2.result().suite == 2
    assert ini.result().prk_out == res2.result().prk_out


def test_negotiation_without_common_suite(pki: PkiFixture) -> None:
    ini, _ = make_pair(pki, "p256", [6], by_reference=True)
    ini.create_message_1()
    with pytest.raises(EdhocError) as info:
        ini.process_error(bytes.fromhex("02820003"))  # SUITES_R [0, 3]
    assert info.value.reason is Reason.UNSUPPORTED_SUITE
    with pytest.raises(LocalProtocolError):
        ini.create_message_1()


def test_responder_refuses_downgrade(pki: PkiFixture) -> None:
    """SUITES_I [6, 2] while R supports 6 too: somebody removed 6, so R answers ERR_CODE 2."""
    ini, res = make_pair(pki, "p256", [6, 2], by_reference=True, responder_suites=[2, 6])
    ini._offered = (6, 2)  # what an attacker-induced retry would send
    with pytest.raises(EdhocError) as info:
        res.process_message_1(ini.create_message_1())
    assert info.value.err_code == 2
    assert info.value.suites_r == [2, 6]


def test_initiator_refuses_loop(pki: PkiFixture) -> None:
    ini, _ = make_pair(pki, "p256", [2], by_reference=True)
    ini.create_message_1()
    with pytest.raises(EdhocError) as info:
        ini.process_error(bytes.fromhex("0202"))  # "use 2" when we offered 2
    assert info.value.reason is Reason.UNSUPPORTED_SUITE


def test_generate_ephemeral_is_valid_and_uniform_range() -> None:
    for suite in (0, 2, 24, -24):
        key = generate_ephemeral(suite, counter_random(suite + 50))
        assert len(key) == (48 if suite == 24 else 32)
    # P-256 rejection sampling: an all-0xff draw is out of range and is redrawn.
    draws = iter([b"\xff" * 32, b"\x00" * 32, b"\x01" * 32])
    assert generate_ephemeral(2, lambda n: next(draws)) == b"\x01" * 32


def test_x5t_handshakes_with_many_seeds_agree(pki: PkiFixture) -> None:
    """Suite 2, x5t, 20 key seeds: every handshake completes and both sides derive the same PRK_out.

    The per-side CPU cost is measured by ``bench/handshake.py`` (docs/benchmarks.md, "Handshake CPU
    per side"), not here: a test neither prints figures between pytest's dots nor asserts a timing.
    """
    outs = set()
    for seed in range(20):
        ini, res = make_pair(pki, "p256", [2], by_reference=True, seed=seed)
        res.process_message_1(ini.create_message_1())
        ini.process_message_2(res.create_message_2())
        res.process_message_3(ini.create_message_3())
        ini.process_message_4(res.create_message_4())
        assert ini.result().prk_out == res.result().prk_out
        outs.add(ini.result().prk_out)
    assert len(outs) == 20  # fresh ephemeral keys: no two sessions share a key


def test_certificate_is_parsed_only_from_der(pki: PkiFixture) -> None:
    with pytest.raises(LocalProtocolError):
        X509Credential(p256_key(1), [b"not a certificate"])
    other = p256_key(2)
    chain = pki.leaf(Role.DEVICE, "dev-8", p256_key(3))
    with pytest.raises(LocalProtocolError):
        X509Credential(other, chain)
    assert isinstance(x509.load_der_x509_certificate(chain[0]), x509.Certificate)


def test_known_chains_index_finds_by_x5t_of_either_algorithm() -> None:
    from sealmq.edhoc import KnownChains, X509Authenticator
    from sealmq.edhoc.wire import X5T_SHA256, X5T_SHA256_64, IdCred, x5t_hash

    chains = [[b"leaf-a", b"ca"], [b"leaf-b"], [b"leaf-a", b"other"], []]
    known = KnownChains(chains)
    assert len(known) == 3  # the empty chain is dropped
    for alg in (X5T_SHA256_64, X5T_SHA256):
        assert known.find(alg, x5t_hash(alg, b"leaf-b")) == [b"leaf-b"]
        assert known.find(alg, x5t_hash(alg, b"leaf-a")) == [b"leaf-a", b"ca"]  # the first one, as before
        assert known.find(alg, x5t_hash(alg, b"leaf-c")) is None
    auth = X509Authenticator(None, Role.DEVICE, None, known_chains=known)  # type: ignore[arg-type]
    assert auth.resolve(IdCred.x5t(b"leaf-b", X5T_SHA256_64)) == [b"leaf-b"]
    with pytest.raises(EdhocError) as info:
        auth.resolve(IdCred.x5t(b"leaf-c", X5T_SHA256_64))
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL
