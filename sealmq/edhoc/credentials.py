"""Credentials for EDHOC: what this side proves itself with, and how a peer's ID_CRED_x is
turned into an authenticated credential.

The handshake never looks inside a credential. It asks a :class:`LocalCredential` to sign
(methods 0/1 on the initiator side, 0/2 on the responder side) or to do a static
Diffie-Hellman (the other cases), and it asks a :class:`PeerAuthenticator` to resolve and
validate the peer's ID_CRED_x. X.509 (``x5chain``/``x5t``) is implemented here; a CCS /
``kid`` static-DH credential for method 3 plugs into the same two protocols.

Authentication failures from the PKI (:class:`~sealmq.errors.CertificateError`) are
re-raised by the handshake as :class:`~sealmq.errors.EdhocError` with the *same* reason
(``unknown_ca``, ``revoked``, ``expired``, ``wrong_role``...), the original chained as
``__cause__``: callers catch one type and audit ``err.reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from cryptography import x509

from sealmq import cbor
from sealmq.edhoc.suites import PREFERRED_SUITES, Suite, exchange, get_suite
from sealmq.edhoc.wire import X5T_SHA256_64, IdCred, x5t_hash
from sealmq.errors import CertificateError, EdhocError, LocalProtocolError, Reason
from sealmq.identity import PeerIdentity, Role

MAX_CERT_LEN = 8192


class AuthKind(Enum):
    SIGNATURE = "signature"
    STATIC_DH = "static_dh"


@dataclass(frozen=True)
class AuthenticatedPeer:
    """What a :class:`PeerAuthenticator` vouches for."""

    cred: bytes  # CRED_x exactly as it goes into context_2/3 (a CBOR item)
    public_key: Any  # signature key, or static DH key (methods 1..3)
    identity: PeerIdentity  # opaque to EDHOC: pki.verify.VerifiedPeer, a CcsIdentity...


class PeerAuthenticator(Protocol):
    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        """Resolve and validate ID_CRED_x; raise a SealmqError (EdhocError/CertificateError) if not."""
        ...


class LocalCredential(Protocol):
    """This side's credential. Implement ``sign`` or ``static_dh`` according to ``kind``."""

    @property
    def id_cred(self) -> IdCred: ...

    @property
    def cred(self) -> bytes: ...

    @property
    def kind(self) -> AuthKind: ...

    def supports(self, suite: Suite) -> bool:
        """Whether this credential can authenticate under ``suite``."""
        ...

    def sign(self, suite: Suite, message: bytes) -> bytes: ...

    def static_dh(self, suite: Suite, peer_public: bytes) -> bytes:
        """ECDH of the static private key with a peer's wire-format ephemeral key."""
        ...


def suites_for(credential: LocalCredential, candidates: Sequence[int] = PREFERRED_SUITES) -> tuple[int, ...]:
    """The suites of ``candidates`` (kept in their order) that ``credential`` can authenticate
    under: e.g. (0,) for an Ed25519 key, (-24,) for RSA, (2, -24) for a P-256 CCS."""
    return tuple(s for s in candidates if credential.supports(get_suite(s)))


@dataclass(frozen=True)
class X509Credential:
    """A signature key and its certificate chain (leaf first), sent by value or by reference.

    CRED_x is the leaf certificate DER as a CBOR byte string (as in RFC 9529 trace 1).
    ``by_reference`` sends ``x5t`` (the peer must already know the chain), otherwise
    ``x5chain`` carries the whole chain.
    """

    private_key: Any
    chain_der: Sequence[bytes]
    by_reference: bool = False
    x5t_alg: int = X5T_SHA256_64
    _id_cred: IdCred = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chain_der:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "empty certificate chain")
        try:
            leaf = x509.load_der_x509_certificate(bytes(self.chain_der[0]))
        except ValueError:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "leaf certificate is not DER") from None
        if leaf.public_key() != self.private_key.public_key():
            raise LocalProtocolError(Reason.CONFIG_INVALID, "private key does not match the leaf certificate")
        id_cred = (
            IdCred.x5t(self.chain_der[0], self.x5t_alg)
            if self.by_reference
            else IdCred.x5chain(self.chain_der)
        )
        object.__setattr__(self, "_id_cred", id_cred)

    @property
    def id_cred(self) -> IdCred:
        return self._id_cred

    @property
    def cred(self) -> bytes:
        return cbor.dumps(bytes(self.chain_der[0]))

    @property
    def kind(self) -> AuthKind:
        return AuthKind.SIGNATURE

    def supports(self, suite: Suite) -> bool:
        return suite.signature_key_matches(self.private_key)

    def sign(self, suite: Suite, message: bytes) -> bytes:
        return suite.sign(self.private_key, message)

    def static_dh(self, suite: Suite, peer_public: bytes) -> bytes:
        raise LocalProtocolError(
            Reason.UNSUPPORTED_METHOD, "an X.509 signature credential has no static DH key"
        )


class StaticDhKey:
    """Helper for static-DH credentials: ECDH of a static private key with a wire public key."""

    def __init__(self, private_key: Any) -> None:
        self.private_key = private_key

    def exchange(self, suite: Suite, peer_public: bytes) -> bytes:
        return exchange(self.private_key, suite.load_public(peer_public))


class TrustStoreLike(Protocol):
    """The part of ``pki.verify.TrustStore`` EDHOC uses (structural, so the core needs no pki import)."""

    def verify(self, chain: Sequence[bytes], *, role: Role, now: datetime) -> PeerIdentity: ...


class KnownChains:
    """Chains a peer may name by ``x5t`` (each leaf first), indexed by thumbprint.

    Build it once per set of chains (e.g. when the CA's issued certificates change) and pass it to
    every :class:`X509Authenticator`: a lookup is then one hash-table probe instead of hashing every
    known certificate in every handshake. Thumbprints are public (hashes of certificates), so the
    lookup need not be constant-time; what it finds is still validated in full.
    """

    def __init__(self, chains: Sequence[Sequence[bytes]] = ()) -> None:
        self.chains = [list(c) for c in chains if c]
        self._by_alg: dict[int, dict[bytes, list[bytes]]] = {}

    def __len__(self) -> int:
        return len(self.chains)

    def find(self, alg: int, thumbprint: bytes) -> list[bytes] | None:
        index = self._by_alg.get(alg)
        if index is None:
            index = {}
            for chain in self.chains:
                index.setdefault(x5t_hash(alg, chain[0]), chain)  # the first of equal leaves wins
            self._by_alg[alg] = index
        return index.get(thumbprint)


class X509Authenticator:
    """Resolves ``x5chain``/``x5t`` and validates the chain with the operator's trust store.

    ``x5t`` is looked up among ``known_chains`` (each leaf first); an ``x5t`` nobody knows
    is ``EdhocError(UNKNOWN_CREDENTIAL)``. The trust store's answer (``VerifiedPeer``) becomes
    ``AuthenticatedPeer.identity`` and its ``public_key`` the key the signature is checked with.
    """

    def __init__(
        self,
        trust_store: TrustStoreLike,
        role: Role,
        now: datetime,
        known_chains: Sequence[Sequence[bytes]] | KnownChains = (),
    ) -> None:
        self.trust_store = trust_store
        self.role = role
        self.now = now
        self.known = known_chains if isinstance(known_chains, KnownChains) else KnownChains(known_chains)

    def resolve(self, id_cred: IdCred) -> list[bytes]:
        chain = id_cred.get_x5chain()
        if chain is not None:
            if any(len(c) > MAX_CERT_LEN for c in chain):
                raise EdhocError(Reason.TOO_LARGE, "certificate too large")
            return chain
        x5t = id_cred.get_x5t()
        if x5t is not None:
            alg, thumb = x5t
            known = self.known.find(alg, thumb)
            if known is not None:
                return known
            raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "x5t matches no known certificate")
        raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "ID_CRED_x is neither x5chain nor x5t")

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        chain = self.resolve(id_cred)
        try:
            verified = self.trust_store.verify(chain, role=self.role, now=self.now)
        except CertificateError as exc:
            raise EdhocError(exc.reason, "peer certificate rejected") from exc
        return AuthenticatedPeer(cred=cbor.dumps(chain[0]), public_key=verified.public_key, identity=verified)
