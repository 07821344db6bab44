"""Hypothesis on every PKI parsing entry point: garbage and mutated valid inputs only ever raise
the project's errors (never ValueError, TypeError, a cryptography or pyasn1-style exception)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from pki import issue, keys
from pki.verify import (
    TrustStore,
    load_certificate,
    load_certificates_pem,
    load_chain,
    load_crls_pem,
)
from sealmq.errors import CertificateError, CsrError, KeyFileError, PkiError
from sealmq.identity import Role

NOW = datetime.now(UTC)
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM

_root_key, _inter_key = keys.generate(keys.KeyType.P256), keys.generate(keys.KeyType.P256)
ROOT = issue.make_root(_root_key, NOW, path_len=1)
INTER = issue.make_issuing(_inter_key, ROOT, _root_key, NOW)
LEAF_KEY = keys.generate(keys.KeyType.ED25519)
CSR = issue.make_csr(LEAF_KEY, Role.DEVICE, "fuzz-dev")
LEAF = issue.issue_leaf(issue.check_csr(CSR, Role.DEVICE), INTER, _inter_key, NOW)
CRL = issue.make_crl(INTER, _inter_key, [], NOW, number=1)
ROOT_CRL = issue.make_crl(ROOT, _root_key, [], NOW, number=1)
STORE = TrustStore([ROOT], [INTER], [CRL, ROOT_CRL])
KEY_PEM = keys.to_pem(keys.generate(keys.KeyType.P256))
LOCKED_KEY_PEM = keys.to_pem(LEAF_KEY, b"pw")


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """Byte flips, truncations, insertions and deletions of a valid input."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[pos] ^= draw(st.integers(1, 255))
            elif op == "truncate":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif data:
                del data[pos : pos + draw(st.integers(1, 8))]
        return bytes(data)

    return build()


def leaf_der() -> bytes:
    return LEAF.public_bytes(DER)


def test_the_fixture_is_valid() -> None:
    """Otherwise the properties below would be vacuous: the unmutated inputs all succeed."""
    peer = STORE.verify([leaf_der(), INTER.public_bytes(DER)], role=Role.DEVICE, now=NOW)
    assert peer.name == "fuzz-dev"
    assert load_certificate(LEAF.public_bytes(PEM)) == LEAF
    assert issue.check_csr(issue.load_csr(CSR.public_bytes(PEM)), Role.DEVICE).name == "fuzz-dev"
    assert keys.from_pem(LOCKED_KEY_PEM, b"pw") is not None
    assert len(load_crls_pem(CRL.public_bytes(PEM) + ROOT_CRL.public_bytes(PEM))) == 2


@given(st.binary(max_size=600) | mutated(leaf_der()) | mutated(LEAF.public_bytes(PEM)))
def test_certificate_loading(data: bytes) -> None:
    for loader in (load_certificate, load_chain, load_certificates_pem):
        with contextlib.suppress(CertificateError):
            loader(data)  # type: ignore[operator]


@given(mutated(leaf_der()) | st.binary(max_size=400))
def test_trust_store_verify_on_mutated_leaf(data: bytes) -> None:
    try:
        peer = STORE.verify([data], role=Role.DEVICE, now=NOW)
    except CertificateError:
        return
    # A mutation that still verifies can only be an equivalent encoding of the same identity.
    assert peer.name == "fuzz-dev"


@given(mutated(INTER.public_bytes(DER)))
def test_trust_store_verify_on_mutated_intermediate(data: bytes) -> None:
    with contextlib.suppress(CertificateError):
        STORE.verify([leaf_der(), data], role=Role.DEVICE, now=NOW)


@given(st.binary(max_size=600) | mutated(CSR.public_bytes(DER)) | mutated(CSR.public_bytes(PEM)))
def test_csr_loading_and_checking(data: bytes) -> None:
    with contextlib.suppress(CsrError):
        issue.check_csr(issue.load_csr(data), Role.DEVICE)


@given(st.binary(max_size=400) | mutated(KEY_PEM) | mutated(LOCKED_KEY_PEM), st.sampled_from([None, b"pw"]))
def test_key_loading(data: bytes, passphrase: bytes | None) -> None:
    with contextlib.suppress(KeyFileError):
        keys.from_pem(data, passphrase)


@given(st.binary(max_size=400) | mutated(CRL.public_bytes(PEM)) | mutated(ROOT.public_bytes(PEM)))
def test_crl_and_store_loading(data: bytes) -> None:
    with contextlib.suppress(CertificateError):
        load_crls_pem(data)
    with contextlib.suppress(PkiError):
        TrustStore.from_pem(data, data, data)
