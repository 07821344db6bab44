"""CCS credentials for EDHOC methods 1..3: a CWT Claims Set (RFC 8392) whose ``cnf`` claim holds
a P-256 COSE_Key, the raw-public-key credential of constrained devices (RFC 9528 3.5.2).

The wire form (also CRED_x, exactly as it goes into context_2/3 and TH_3/TH_4)::

    CCS = { ? 1: iss (tstr), 2: sub (tstr), ? 4: exp, ? 5: nbf, ? 6: iat (uint),
            8: { 1: COSE_Key } }
    COSE_Key = { 1: 2 (EC2), 2: kid (bstr), -1: 1 (P-256), -2: x (32 bytes), -3: y (32 bytes) }

``sub`` is ``urn:sealmq:<role>:<name>`` for credentials sealmq issues; the RFC 9529 trace 2
credentials (``sub`` = "42-50-31-FF-EF-37-32-39") are accepted too, with the role given by
the registry entry. A credential is named by ``kid`` (``ID_CRED_x = {4: kid}``, compact on the
wire) or sent by value (``{14: CCS}``, ``kccs``).

There is no CA behind a CCS: trust is *registration*. :class:`CcsRegistry` holds the credentials
the operator registered (kid -> role, name, CCS, revoked); :class:`CcsAuthenticator` accepts a peer
only if its kid is registered, not revoked, of the expected role and within ``nbf``/``exp``, and
a credential sent by value must equal the registered one byte for byte.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sealmq import cbor
from sealmq.edhoc.credentials import AuthenticatedPeer, AuthKind, PeerAuthenticator
from sealmq.edhoc.suites import CURVE_P256, Suite, exchange
from sealmq.edhoc.wire import IdCred
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError
from sealmq.identity import CredentialKind, Role

# CWT claim keys (RFC 8392) and the confirmation method (RFC 8747).
CLAIM_ISS, CLAIM_SUB, CLAIM_EXP, CLAIM_NBF, CLAIM_IAT, CLAIM_CNF = 1, 2, 4, 5, 6, 8
CNF_COSE_KEY = 1
# COSE_Key labels and values (RFC 9052/9053).
KEY_KTY, KEY_KID, KEY_CRV, KEY_X, KEY_Y = 1, 2, -1, -2, -3
KTY_EC2, CRV_P256 = 2, 1
HDR_KCCS = 14  # COSE header parameter "kccs" (RFC 9528 3.5.2): the CCS by value

MAX_CCS_LEN = 1024
MAX_KID_LEN = 16
MAX_SUBJECT_LEN = 256
URI_PREFIX = "urn:sealmq:"
ROLES = tuple(r.value for r in Role)

_CLAIMS = {CLAIM_ISS, CLAIM_SUB, CLAIM_EXP, CLAIM_NBF, CLAIM_IAT, CLAIM_CNF}
_KEY_LABELS = {KEY_KTY, KEY_KID, KEY_CRV, KEY_X, KEY_Y}


@dataclass(frozen=True)
class Ccs:
    """A parsed CCS. ``encoded`` is the exact deterministic CBOR (= CRED_x)."""

    encoded: bytes
    subject: str
    kid: bytes
    public_key: ec.EllipticCurvePublicKey = field(compare=False)
    issuer: str | None = None
    not_before: int | None = None
    expires: int | None = None
    issued_at: int | None = None

    @property
    def identity(self) -> tuple[str, str] | None:
        """(role, name) if ``sub`` is a sealmq identity URI, else None."""
        return parse_subject(self.subject)


def parse_subject(subject: str) -> tuple[str, str] | None:
    if not subject.startswith(URI_PREFIX):
        return None
    role, sep, name = subject[len(URI_PREFIX):].partition(":")
    if not sep or role not in ROLES or not name or ":" in name:
        return None
    return role, name


def subject_uri(role: str, name: str) -> str:
    if role not in ROLES or not name or ":" in name:
        raise LocalProtocolError(Reason.CONFIG_INVALID, "invalid CCS identity")
    return f"{URI_PREFIX}{role}:{name}"


def _coord(value: int) -> bytes:
    return value.to_bytes(32, "big")


def encode_ccs(
    subject: str,
    kid: bytes,
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer: str | None = None,
    not_before: int | None = None,
    expires: int | None = None,
    issued_at: int | None = None,
) -> bytes:
    """The deterministic CCS bytes for a P-256 static DH public key."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise LocalProtocolError(Reason.UNSUPPORTED_ALGORITHM, "a CCS here holds a P-256 key")
    if not 0 < len(kid) <= MAX_KID_LEN:
        raise LocalProtocolError(Reason.CONFIG_INVALID, f"kid must be 1..{MAX_KID_LEN} bytes")
    nums = public_key.public_numbers()
    claims: dict[int, Any] = {
        CLAIM_SUB: subject,
        CLAIM_CNF: {
            CNF_COSE_KEY: {
                KEY_KTY: KTY_EC2,
                KEY_KID: bytes(kid),
                KEY_CRV: CRV_P256,
                KEY_X: _coord(nums.x),
                KEY_Y: _coord(nums.y),
            }
        },
    }
    for label, value in ((CLAIM_ISS, issuer), (CLAIM_NBF, not_before), (CLAIM_EXP, expires),
                         (CLAIM_IAT, issued_at)):
        if value is not None:
            claims[label] = value
    data = cbor.dumps(claims)
    decode_ccs(data)  # what we write, we can read: refuses e.g. an over-long subject
    return data


def _opt_uint(claims: dict[Any, Any], label: int, what: str) -> int | None:
    return None if label not in claims else cbor.as_uint(claims[label], what)


def decode_ccs(data: bytes) -> Ccs:
    """Strictly decode a CCS; anything else is :class:`DecodeError` (or INVALID_POINT)."""
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError(Reason.WRONG_TYPE, "CCS must be bytes")
    if len(data) > MAX_CCS_LEN:
        raise DecodeError(Reason.TOO_LARGE, "CCS too large")
    data = bytes(data)
    claims = cbor.as_map(cbor.loads(data), "CCS")
    return _from_claims(claims, data)


def ccs_from_item(item: Any) -> Ccs:
    """A CCS received as a decoded CBOR map (e.g. the value of ``kccs``)."""
    claims = cbor.as_map(item, "CCS")
    data = cbor.dumps(claims)
    if len(data) > MAX_CCS_LEN:
        raise DecodeError(Reason.TOO_LARGE, "CCS too large")
    return _from_claims(claims, data)


def _from_claims(claims: dict[Any, Any], data: bytes) -> Ccs:
    for label in claims:
        if isinstance(label, bool) or not isinstance(label, int):
            raise DecodeError(Reason.WRONG_TYPE, "CCS claim keys are integers")
        if label not in _CLAIMS:
            raise DecodeError(Reason.UNSUPPORTED, f"CCS claim {label} not supported")
    if CLAIM_SUB not in claims or CLAIM_CNF not in claims:
        raise DecodeError(Reason.WRONG_TYPE, "CCS needs sub (2) and cnf (8)")
    subject = cbor.as_text(claims[CLAIM_SUB], "sub", max_len=MAX_SUBJECT_LEN)
    issuer = None if CLAIM_ISS not in claims else cbor.as_text(claims[CLAIM_ISS], "iss", max_len=MAX_SUBJECT_LEN)
    cnf = cbor.as_map(claims[CLAIM_CNF], "cnf")
    if set(cnf) != {CNF_COSE_KEY}:
        raise DecodeError(Reason.UNSUPPORTED, "cnf must hold exactly one COSE_Key (1)")
    key = cbor.as_map(cnf[CNF_COSE_KEY], "COSE_Key")
    if set(key) != _KEY_LABELS:
        raise DecodeError(Reason.UNSUPPORTED, "COSE_Key must be {1, 2, -1, -2, -3} (EC2 with kid)")
    if cbor.as_int(key[KEY_KTY], "kty") != KTY_EC2 or cbor.as_int(key[KEY_CRV], "crv") != CRV_P256:
        raise DecodeError(Reason.UNSUPPORTED_ALGORITHM, "only EC2 P-256 keys")
    kid = cbor.as_bytes(key[KEY_KID], "kid", max_len=MAX_KID_LEN)
    if not kid:
        raise DecodeError(Reason.WRONG_TYPE, "kid must not be empty")
    x = cbor.as_bytes(key[KEY_X], "x", max_len=32)
    y = cbor.as_bytes(key[KEY_Y], "y", max_len=32)
    if len(x) != 32 or len(y) != 32:
        raise DecodeError(Reason.WRONG_TYPE, "P-256 coordinates are 32 bytes")
    try:
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise DecodeError(Reason.INVALID_POINT, "CCS key is not a P-256 point") from None
    return Ccs(
        encoded=data,
        subject=subject,
        kid=kid,
        public_key=public_key,
        issuer=issuer,
        not_before=_opt_uint(claims, CLAIM_NBF, "nbf"),
        expires=_opt_uint(claims, CLAIM_EXP, "exp"),
        issued_at=_opt_uint(claims, CLAIM_IAT, "iat"),
    )


# --- this side's credential ------------------------------------------------------------------


class CcsCredential:
    """A static DH key pair and its CCS: a :class:`~sealmq.edhoc.credentials.LocalCredential`
    for the static-DH side of methods 1..3 (method 3 on both sides for sealmq devices).

    ``by_value`` sends ``{14: CCS}`` instead of ``{4: kid}`` (the peer must still have it registered).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, ccs: bytes, *, by_value: bool = False) -> None:
        self.ccs = decode_ccs(ccs)
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or (
            private_key.public_key().public_numbers() != self.ccs.public_key.public_numbers()
        ):
            raise LocalProtocolError(Reason.CONFIG_INVALID, "private key does not match the CCS")
        self._private_key = private_key
        self.by_value = by_value
        self._id_cred = (
            IdCred.from_map({HDR_KCCS: cbor.loads(self.ccs.encoded)}) if by_value else IdCred.kid(self.ccs.kid)
        )

    def __repr__(self) -> str:  # never print the key
        return f"CcsCredential(sub={self.ccs.subject!r}, kid={self.ccs.kid.hex()}, by_value={self.by_value})"

    @property
    def id_cred(self) -> IdCred:
        return self._id_cred

    @property
    def cred(self) -> bytes:
        return self.ccs.encoded

    @property
    def kind(self) -> AuthKind:
        return AuthKind.STATIC_DH

    def supports(self, suite: Suite) -> bool:
        return suite.curve == CURVE_P256

    def sign(self, suite: Suite, message: bytes) -> bytes:
        raise LocalProtocolError(Reason.UNSUPPORTED_METHOD, "a CCS static DH credential does not sign")

    def static_dh(self, suite: Suite, peer_public: bytes) -> bytes:
        if suite.curve != CURVE_P256:
            raise LocalProtocolError(Reason.UNSUPPORTED_ALGORITHM, f"suite {suite.ident} is not P-256")
        return exchange(self._private_key, suite.load_public(peer_public))


# --- registry and authenticator ----------------------------------------------------------------


@dataclass(frozen=True)
class CcsIdentity:
    """Who a registered CCS belongs to (a :class:`~sealmq.identity.PeerIdentity`); ``name`` is
    the device id or the backend name, ``public_key`` the static DH key of the CCS."""

    role: Role
    name: str
    kid: bytes
    subject: str
    public_key: ec.EllipticCurvePublicKey = field(compare=False)

    @property
    def credential(self) -> str:
        return f"ccs kid {self.kid.hex()}"

    @property
    def kind(self) -> CredentialKind:
        return CredentialKind.CCS

    @property
    def credential_ref(self) -> bytes:
        return self.kid


@dataclass(frozen=True)
class CcsEntry:
    """One registered credential. ``role``/``name`` default to what ``sub`` says."""

    ccs: Ccs
    role: str
    name: str
    revoked: bool = False

    @classmethod
    def from_bytes(cls, data: bytes, *, role: str | None = None, name: str | None = None,
                   revoked: bool = False) -> CcsEntry:
        ccs = decode_ccs(data)
        ident = ccs.identity
        role = role if role is not None else (ident[0] if ident else None)
        name = name if name is not None else (ident[1] if ident else None)
        if role not in ROLES or not name:
            raise DecodeError(Reason.POLICY_VIOLATION, "CCS subject is not urn:sealmq:<role>:<name>")
        if ident is not None and ident != (role, name):
            raise DecodeError(Reason.IDENTITY_MISMATCH, "registry entry contradicts the CCS subject")
        return cls(ccs, str(role), name, revoked)


class CcsRegistry:
    """The credentials an operator registered, by kid (sans-IO; ``pki.ccs`` loads it from disk)."""

    def __init__(self, entries: Iterable[CcsEntry] = ()) -> None:
        self._by_kid: dict[bytes, CcsEntry] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: CcsEntry) -> None:
        if entry.ccs.kid in self._by_kid:
            raise LocalProtocolError(Reason.ALREADY_EXISTS, f"kid {entry.ccs.kid.hex()} already registered")
        self._by_kid[entry.ccs.kid] = entry

    def by_kid(self, kid: bytes) -> CcsEntry | None:
        return self._by_kid.get(bytes(kid))

    def find(self, role: str, name: str) -> list[CcsEntry]:
        return [e for e in self._by_kid.values() if e.role == role and e.name == name]

    @property
    def entries(self) -> list[CcsEntry]:
        return list(self._by_kid.values())

    def __len__(self) -> int:
        return len(self._by_kid)


class CcsAuthenticator:
    """Resolves ``kid``/``kccs`` against a :class:`CcsRegistry` for peers of ``role``.

    Reasons: UNKNOWN_CREDENTIAL (kid not registered, kccs differs from the registered CCS, or
    ID_CRED_x is no kid/kccs), REVOKED, WRONG_ROLE, EXPIRED / NOT_YET_VALID (against ``now``,
    seconds since the epoch; ``None`` skips the time check).
    """

    def __init__(self, registry: CcsRegistry, role: Role | str, now: float | None = None) -> None:
        self.registry = registry
        self.role = Role(role).value
        self.now = now

    def _resolve(self, id_cred: IdCred) -> CcsEntry:
        params = id_cred.params
        kid = id_cred.get_kid()
        if kid is not None:
            entry = self.registry.by_kid(kid)
            if entry is None:
                raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "kid is not registered")
            return entry
        if set(params) == {HDR_KCCS}:
            try:
                sent = ccs_from_item(params[HDR_KCCS])
            except SealmqError as exc:
                raise EdhocError(exc.reason, "kccs is not a valid CCS") from exc
            entry = self.registry.by_kid(sent.kid)
            if entry is None or not hmac.compare_digest(entry.ccs.encoded, sent.encoded):
                raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "kccs is not a registered credential")
            return entry
        raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "ID_CRED_x is neither kid nor kccs")

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        entry = self._resolve(id_cred)
        if entry.revoked:
            raise EdhocError(Reason.REVOKED, "credential revoked")
        if entry.role != self.role:
            raise EdhocError(Reason.WRONG_ROLE, f"credential of a {entry.role}, expected a {self.role}")
        if self.now is not None:
            if entry.ccs.not_before is not None and self.now < entry.ccs.not_before:
                raise EdhocError(Reason.NOT_YET_VALID, "credential not yet valid")
            if entry.ccs.expires is not None and self.now >= entry.ccs.expires:
                raise EdhocError(Reason.EXPIRED, "credential expired")
        identity = CcsIdentity(Role(entry.role), entry.name, entry.ccs.kid, entry.ccs.subject,
                               entry.ccs.public_key)
        return AuthenticatedPeer(cred=entry.ccs.encoded, public_key=entry.ccs.public_key, identity=identity)


def is_ccs_id_cred(id_cred: IdCred) -> bool:
    """Whether ID_CRED_x names a CCS (kid or kccs) rather than a certificate."""
    return id_cred.get_kid() is not None or set(id_cred.params) == {HDR_KCCS}


class MixedAuthenticator:
    """Routes kid/kccs to ``ccs`` and everything else (x5t, x5chain) to ``x509``, so that one
    backend serves method-0 (certificate) and method-3 (CCS) devices side by side."""

    def __init__(self, ccs: PeerAuthenticator | None, x509: PeerAuthenticator | None) -> None:
        self.ccs = ccs
        self.x509 = x509

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        target = self.ccs if is_ccs_id_cred(id_cred) else self.x509
        if target is None:
            raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "no authenticator for this kind of credential")
        return target.authenticate(id_cred)
