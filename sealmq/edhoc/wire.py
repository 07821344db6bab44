"""Wire encodings of EDHOC (RFC 9528): messages, plaintexts, the error message, EAD items,
connection identifiers and compact ID_CRED_x.

Everything here is a pure function from values to deterministic CBOR bytes and back. The
decoders take bytes from the network and raise only :class:`~sealmq.errors.DecodeError` or
:class:`~sealmq.errors.EdhocError`; they never see keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sealmq import cbor
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError

MAX_CONN_ID_LEN = 32  # not bounded by the RFC; ours are short, and garbage must stay cheap
MAX_SUITES = 16
MAX_ID_CRED_PARAMS = 8
MAX_X5CHAIN = 8
MAX_ERR_INFO = 256

HDR_KID = 4
HDR_X5CHAIN = 33
HDR_X5T = 34

ERR_UNSPECIFIED = 1
ERR_WRONG_SUITE = 2
ERR_UNKNOWN_CREDENTIAL = 3

EAD_PADDING = 0

X5T_SHA256_64 = -15
X5T_SHA256 = -16


def x5t_hash(alg: int, cert_der: bytes) -> bytes:
    """The COSE x5t thumbprint (RFC 9360) of a DER certificate."""
    if alg == X5T_SHA256_64:
        return hashlib.sha256(cert_der).digest()[:8]
    if alg == X5T_SHA256:
        return hashlib.sha256(cert_der).digest()
    raise EdhocError(Reason.UNSUPPORTED_ALGORITHM, f"x5t hash algorithm {alg} not supported")


class EadItem(NamedTuple):
    """One External Authorization Data item; a negative label marks it critical."""

    label: int
    value: bytes | None = None

    @property
    def critical(self) -> bool:
        return self.label < 0


# --- one-byte identifiers (RFC 9528 3.3.2) --------------------------------------------------


def _as_small_int(raw: bytes) -> int | None:
    """The CBOR int whose one-byte encoding is ``raw``, if there is one (-24..23)."""
    if len(raw) != 1:
        return None
    b = raw[0]
    if b <= 0x17:
        return b
    if 0x20 <= b <= 0x37:
        return -1 - (b - 0x20)
    return None


def encode_identifier(raw: bytes) -> int | bytes:
    """A byte-string identifier (C_x, kid) as it goes on the wire: an int when one byte allows it."""
    small = _as_small_int(raw)
    return raw if small is None else small


def decode_identifier(item: Any, what: str) -> bytes:
    """Inverse of :func:`encode_identifier`; the non-compact form of a small int is rejected."""
    if isinstance(item, int) and not isinstance(item, bool):
        if -24 <= item <= 23:
            return cbor.dumps(item)
        raise DecodeError(Reason.WRONG_TYPE, f"{what} integer out of range")
    raw = cbor.as_bytes(item, what, max_len=MAX_CONN_ID_LEN)
    if _as_small_int(raw) is not None:
        raise DecodeError(Reason.NOT_DETERMINISTIC, f"{what} must be encoded as an integer")
    return raw


# --- ID_CRED_x ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdCred:
    """ID_CRED_x: a COSE header map that identifies a credential (``kid``, ``x5t``, ``x5chain``...).

    ``encoded`` is the deterministic CBOR map, which is what goes into context_2/3 and the
    Sig_structure; :meth:`compact` is what goes into PLAINTEXT_2/3.
    """

    encoded: bytes

    @classmethod
    def from_map(cls, params: dict[int, Any]) -> IdCred:
        if not params:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "ID_CRED_x must not be empty")
        return cls(cbor.dumps(params))

    @classmethod
    def kid(cls, kid: bytes) -> IdCred:
        return cls.from_map({HDR_KID: kid})

    @classmethod
    def x5t(cls, cert_der: bytes, alg: int = -15) -> IdCred:
        return cls.from_map({HDR_X5T: [alg, x5t_hash(alg, cert_der)]})

    @classmethod
    def x5chain(cls, chain_der: Sequence[bytes]) -> IdCred:
        if not chain_der:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "empty certificate chain")
        value: Any = chain_der[0] if len(chain_der) == 1 else list(chain_der)
        return cls.from_map({HDR_X5CHAIN: value})

    @property
    def params(self) -> dict[Any, Any]:
        return cbor.as_map(cbor.loads(self.encoded), "ID_CRED_x")

    def get_kid(self) -> bytes | None:
        p = self.params
        value = p.get(HDR_KID)
        return value if isinstance(value, bytes) and len(p) == 1 else None

    def get_x5t(self) -> tuple[int, bytes] | None:
        value = self.params.get(HDR_X5T)
        if value is None:
            return None
        pair = cbor.as_list(value, "x5t", length=2)
        return cbor.as_int(pair[0], "x5t alg"), cbor.as_bytes(pair[1], "x5t hash", max_len=64)

    def get_x5chain(self) -> list[bytes] | None:
        value = self.params.get(HDR_X5CHAIN)
        if value is None:
            return None
        if isinstance(value, bytes):
            return [value]
        certs = cbor.as_list(value, "x5chain")
        if not certs or len(certs) > MAX_X5CHAIN:
            raise DecodeError(Reason.WRONG_TYPE, "x5chain must hold 1..8 certificates")
        return [cbor.as_bytes(c, "x5chain certificate") for c in certs]

    def compact(self) -> Any:
        """The PLAINTEXT_x form: a lone ``kid`` is sent as its bare identifier (RFC 9528 3.5.3.2)."""
        kid = self.get_kid()
        if kid is not None:
            return encode_identifier(kid)
        return self.params


def decode_id_cred(item: Any) -> IdCred:
    if isinstance(item, (int, bytes)) and not isinstance(item, bool):
        return IdCred.kid(decode_identifier(item, "kid"))
    params = cbor.as_map(item, "ID_CRED_x")
    if not params or len(params) > MAX_ID_CRED_PARAMS:
        raise DecodeError(Reason.WRONG_TYPE, "ID_CRED_x must hold 1..8 parameters")
    for key in params:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise DecodeError(Reason.WRONG_TYPE, "COSE header labels are int or text")
    if set(params) == {HDR_KID}:
        raise DecodeError(Reason.NOT_DETERMINISTIC, "a lone kid must be sent in compact form")
    id_cred = IdCred(cbor.dumps(params))
    id_cred.get_x5t()  # shape checks, so that authenticators see well-formed values
    id_cred.get_x5chain()
    return id_cred


# --- EAD ------------------------------------------------------------------------------------


def encode_ead(items: Iterable[EadItem | tuple[int, bytes | None]]) -> list[Any]:
    out: list[Any] = []
    for label, value in items:
        if isinstance(label, bool) or not isinstance(label, int):
            raise LocalProtocolError(Reason.CONFIG_INVALID, "EAD label must be an int")
        out.append(label)
        if value is not None:
            out.append(bytes(value))
    return out


def decode_ead(items: Sequence[Any], known_labels: frozenset[int]) -> tuple[EadItem, ...]:
    """Parse trailing EAD items; unknown critical items fail the handshake (RFC 9528 3.8)."""
    out: list[EadItem] = []
    i = 0
    while i < len(items):
        label = cbor.as_int(items[i], "ead_label")
        value: bytes | None = None
        if i + 1 < len(items) and isinstance(items[i + 1], bytes):
            value = items[i + 1]
            i += 1
        i += 1
        if label < 0 and -label not in known_labels:
            raise EdhocError(Reason.UNSUPPORTED, f"unknown critical EAD item {label}")
        if label == EAD_PADDING:
            continue
        out.append(EadItem(label, value))
    return tuple(out)


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message1:
    method: int
    suites_i: tuple[int, ...]  # selected suite last
    g_x: bytes
    c_i: bytes
    ead_items: tuple[Any, ...]  # raw, parsed by the state machine against its known labels

    @property
    def selected_suite(self) -> int:
        return self.suites_i[-1]


def encode_suites(suites: Sequence[int]) -> int | list[int]:
    return suites[0] if len(suites) == 1 else list(suites)


def decode_suites(item: Any, what: str) -> tuple[int, ...]:
    if isinstance(item, list):
        if not 2 <= len(item) <= MAX_SUITES:
            raise DecodeError(Reason.WRONG_TYPE, f"{what} array must hold 2..{MAX_SUITES} suites")
        return tuple(cbor.as_int(s, what) for s in item)
    return (cbor.as_int(item, what),)


def encode_message_1(
    method: int, suites_i: Sequence[int], g_x: bytes, c_i: bytes, ead: Sequence[Any]
) -> bytes:
    return cbor.dumps_seq(method, encode_suites(suites_i), g_x, encode_identifier(c_i), *ead)


def decode_message_1(data: bytes) -> Message1:
    items = cbor.loads_seq(data)
    if len(items) < 4:
        raise DecodeError(Reason.MALFORMED, "message_1 needs METHOD, SUITES_I, G_X, C_I")
    method = cbor.as_int(items[0], "METHOD")
    suites = decode_suites(items[1], "SUITES_I")
    g_x = cbor.as_bytes(items[2], "G_X", max_len=133)
    c_i = decode_identifier(items[3], "C_I")
    return Message1(method, suites, g_x, c_i, tuple(items[4:]))


def decode_single_bstr(data: bytes, what: str) -> bytes:
    """message_2/3/4 are each one byte string."""
    items = cbor.loads_seq(data, max_items=1)
    if len(items) != 1:
        raise DecodeError(Reason.MALFORMED, f"{what} must be one byte string")
    return cbor.as_bytes(items[0], what)


@dataclass(frozen=True)
class Plaintext2:
    c_r: bytes
    id_cred_r: IdCred
    signature_or_mac: bytes
    ead_items: tuple[Any, ...]


def decode_plaintext_2(data: bytes) -> Plaintext2:
    items = cbor.loads_seq(data)
    if len(items) < 3:
        raise DecodeError(Reason.MALFORMED, "PLAINTEXT_2 needs C_R, ID_CRED_R, Signature_or_MAC_2")
    return Plaintext2(
        decode_identifier(items[0], "C_R"),
        decode_id_cred(items[1]),
        cbor.as_bytes(items[2], "Signature_or_MAC_2", max_len=1024),
        tuple(items[3:]),
    )


@dataclass(frozen=True)
class Plaintext3:
    id_cred_i: IdCred
    signature_or_mac: bytes
    ead_items: tuple[Any, ...]


def decode_plaintext_3(data: bytes) -> Plaintext3:
    items = cbor.loads_seq(data)
    if len(items) < 2:
        raise DecodeError(Reason.MALFORMED, "PLAINTEXT_3 needs ID_CRED_I, Signature_or_MAC_3")
    return Plaintext3(
        decode_id_cred(items[0]),
        cbor.as_bytes(items[1], "Signature_or_MAC_3", max_len=1024),
        tuple(items[2:]),
    )


def decode_plaintext_4(data: bytes) -> tuple[Any, ...]:
    return () if not data else tuple(cbor.loads_seq(data))


# --- the EDHOC error message (RFC 9528 section 6) ---------------------------------------------


@dataclass(frozen=True)
class ErrorMessage:
    err_code: int
    err_info: str | None = None  # ERR_CODE 1: diagnostic text (never shown as trusted)
    suites_r: tuple[int, ...] | None = None  # ERR_CODE 2


def is_error_message(data: bytes) -> bool:
    """Whether ``data`` looks like an EDHOC error (its first item is an int, not a bstr)."""
    try:
        first = cbor.loads_seq(data, max_items=2)[0]
    except SealmqError:
        return False
    return isinstance(first, int) and not isinstance(first, bool)


def decode_error_message(data: bytes) -> ErrorMessage:
    items = cbor.loads_seq(data, max_items=2)
    if len(items) != 2:
        raise DecodeError(Reason.MALFORMED, "error message is (ERR_CODE, ERR_INFO)")
    code = cbor.as_int(items[0], "ERR_CODE")
    if code == ERR_UNSPECIFIED:
        return ErrorMessage(code, err_info=cbor.as_text(items[1], "ERR_INFO", max_len=MAX_ERR_INFO))
    if code == ERR_WRONG_SUITE:
        return ErrorMessage(code, suites_r=decode_suites(items[1], "SUITES_R"))
    if code == ERR_UNKNOWN_CREDENTIAL:
        if items[1] is not True:
            raise DecodeError(Reason.WRONG_TYPE, "ERR_INFO of ERR_CODE 3 must be true")
        return ErrorMessage(code)
    raise DecodeError(Reason.UNSUPPORTED, f"unknown ERR_CODE {code}")


def encode_error_message(msg: ErrorMessage | SealmqError) -> bytes:
    """Encode an error message; a :class:`SealmqError` is mapped by :func:`encode_error`."""
    if isinstance(msg, SealmqError):
        return encode_error(msg)
    if msg.err_code == ERR_WRONG_SUITE:
        if not msg.suites_r:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "ERR_CODE 2 needs SUITES_R")
        return cbor.dumps_seq(ERR_WRONG_SUITE, encode_suites(msg.suites_r))
    if msg.err_code == ERR_UNKNOWN_CREDENTIAL:
        return cbor.dumps_seq(ERR_UNKNOWN_CREDENTIAL, True)
    return cbor.dumps_seq(ERR_UNSPECIFIED, msg.err_info or "")


def encode_error(err: SealmqError) -> bytes:
    """The EDHOC error message to send for a failed handshake step.

    ERR_INFO is the stable reason code only: the detail string may describe what was
    checked, and the peer (possibly an attacker) learns nothing more than the reason.
    """
    if isinstance(err, EdhocError) and err.err_code == ERR_WRONG_SUITE and err.suites_r:
        return encode_error_message(ErrorMessage(ERR_WRONG_SUITE, suites_r=tuple(err.suites_r)))
    return encode_error_message(ErrorMessage(ERR_UNSPECIFIED, err_info=err.reason.value))
