"""The one error hierarchy of sealmq.

Every decoder and protocol step raises a subclass of :class:`SealmqError`, never a bare
``ValueError``/``KeyError``/library exception. Each error carries a machine-readable
:class:`Reason` that callers and the audit log use (``err.reason.value``), plus an optional
human detail string. Details must never contain secrets or plaintext payloads.

Decryption failures are deliberately opaque: :class:`DecryptError` always has the reason
``Reason.DECRYPT_FAILED`` whatever check failed (tag, nonce, AAD), so that a peer learns
nothing from which check it was.

The split ``Local``/``Remote`` follows h11: a :class:`RemoteProtocolError` means the peer
(or the broker) sent something bad; a :class:`LocalProtocolError` means this side misused
the API (a bug in the caller).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable, machine-readable reasons. Values are written to audit logs: never rename one."""

    # --- generic decoding -------------------------------------------------------------------
    MALFORMED = "malformed"  # not well-formed CBOR / PEM / JSON / structure
    NOT_DETERMINISTIC = "not_deterministic"  # CBOR that is not deterministically encoded
    TRAILING_DATA = "trailing_data"
    WRONG_TYPE = "wrong_type"  # well-formed but a field has the wrong type/shape
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"
    # --- configuration ----------------------------------------------------------------------
    CONFIG_INVALID = "config_invalid"
    # --- PKI / certificates / CSRs ----------------------------------------------------------
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    WRONG_ROLE = "wrong_role"
    IDENTITY_MISMATCH = "identity_mismatch"
    BAD_SIGNATURE = "bad_signature"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    WEAK_KEY = "weak_key"
    POLICY_VIOLATION = "policy_violation"  # e.g. CSR asks for CA:true, foreign name
    ALREADY_EXISTS = "already_exists"
    NOT_FOUND = "not_found"
    BAD_PASSPHRASE = "bad_passphrase"  # noqa: S105 - a reason code, not a password
    CRL_INVALID = "crl_invalid"
    # --- EDHOC ------------------------------------------------------------------------------
    UNEXPECTED_MESSAGE = "unexpected_message"  # wrong state for this message
    UNSUPPORTED_SUITE = "unsupported_suite"  # negotiation: peer must retry with another suite
    UNSUPPORTED_METHOD = "unsupported_method"
    UNKNOWN_CREDENTIAL = "unknown_credential"  # ID_CRED_x could not be resolved
    MAC_FAILED = "mac_failed"
    SIGNATURE_FAILED = "signature_failed"
    INVALID_POINT = "invalid_point"
    PEER_ERROR = "peer_error"  # the peer sent an EDHOC error message
    CONNECTION_ID_IN_USE = "connection_id_in_use"
    TOO_MANY_HANDSHAKES = "too_many_handshakes"  # half-open bound reached
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # --- records / sessions -----------------------------------------------------------------
    DECRYPT_FAILED = "decrypt_failed"  # opaque on purpose
    REPLAY = "replay"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_EPOCH = "unknown_epoch"
    SEQUENCE_EXHAUSTED = "sequence_exhausted"
    KEY_LIMIT_REACHED = "key_limit_reached"
    WRONG_TOPIC = "wrong_topic"
    # --- media ------------------------------------------------------------------------------
    UNKNOWN_TRANSFER = "unknown_transfer"
    CHUNK_OUT_OF_RANGE = "chunk_out_of_range"
    HASH_MISMATCH = "hash_mismatch"
    TRANSFER_EXPIRED = "transfer_expired"
    TOO_MANY_TRANSFERS = "too_many_transfers"
    # --- application messages (telemetry, command, reply bodies) ------------------------------
    BAD_BODY = "bad_body"  # well-formed CBOR, but not the body its record kind requires
    UNKNOWN_COMMAND = "unknown_command"  # a reply names no command sent to that device
    UNEXPECTED_KIND = "unexpected_kind"  # an authenticated record of a kind this side has no use for
    # --- transport / broker -----------------------------------------------------------------
    NOT_AUTHORIZED = "not_authorized"
    # fleet management (issue 16)
    CLAIM_CONFINED = "claim_confined"  # a claim session may only enrol
    CLAIM_EXHAUSTED = "claim_exhausted"  # a claim used as often as it may be
    DOWNGRADE = "downgrade"  # an update whose version is not above the installed one
    WRONG_TARGET = "wrong_target"  # an update for another device or device class
    TRANSPORT_FAILED = "transport_failed"
    # --- per-device bounds of the backend (docs/operations.md) ---------------------------------
    RATE_LIMITED = "rate_limited"  # more records per second than the device's share
    QUOTA_EXCEEDED = "quota_exceeded"  # storing it would pass the device's stored-bytes quota


class SealmqError(Exception):
    """Base of every error sealmq raises on purpose."""

    default_reason: Reason = Reason.MALFORMED

    def __init__(self, reason: Reason | None = None, detail: str = "") -> None:
        self.reason: Reason = reason if reason is not None else self.default_reason
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


class LocalProtocolError(SealmqError):
    """This side misused the API (wrong state, bad argument). A bug in the caller."""

    default_reason = Reason.UNEXPECTED_MESSAGE


class RemoteProtocolError(SealmqError):
    """The peer, the broker or an attacker sent something we reject."""


class DecodeError(RemoteProtocolError):
    """Input bytes are not a well-formed, deterministic, correctly-shaped message."""


class ConfigError(SealmqError):
    """A configuration file or option is invalid."""

    default_reason = Reason.CONFIG_INVALID


# --- PKI ----------------------------------------------------------------------------------
class PkiError(SealmqError):
    """Anything the PKI refuses: bad CSR, bad certificate, failed path validation."""


class CertificateError(PkiError):
    """A certificate (chain) failed parsing or validation; ``reason`` says why."""


class CsrError(PkiError):
    """A certificate signing request is malformed or violates policy."""


class KeyFileError(PkiError):
    """A private/public key file is malformed, of an unsupported type, or locked."""


# --- EDHOC --------------------------------------------------------------------------------
class EdhocError(RemoteProtocolError):
    """An EDHOC handshake failed.

    ``err_code`` is the EDHOC ERR_CODE to send to the peer (1 = unspecified error,
    2 = wrong selected cipher suite), ``suites_r`` carries the responder's supported suites
    for ERR_CODE 2.
    """

    default_reason = Reason.UNEXPECTED_MESSAGE

    def __init__(
        self,
        reason: Reason | None = None,
        detail: str = "",
        *,
        err_code: int = 1,
        suites_r: list[int] | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.err_code = err_code
        self.suites_r = suites_r


# --- records / sessions -------------------------------------------------------------------
class RecordError(RemoteProtocolError):
    """A sealed record was rejected."""


class DecryptError(RecordError):
    """AEAD open failed. Always opaque: never says which check failed."""

    default_reason = Reason.DECRYPT_FAILED

    def __init__(self) -> None:
        super().__init__(Reason.DECRYPT_FAILED, "")


class ReplayError(RecordError):
    """Duplicate or too-old sequence number."""

    default_reason = Reason.REPLAY


class SessionError(SealmqError):
    """The session cannot proceed (no keys, sequence exhausted, key limits reached)."""

    default_reason = Reason.UNKNOWN_SESSION


# --- application messages -------------------------------------------------------------------
class BodyError(DecodeError):
    """A telemetry, command or reply body was refused (:mod:`sealmq.bodies`).

    ``reason`` is the CBOR-level reason (``malformed``, ``not_deterministic``...) when the bytes
    are not one strict CBOR item, else ``bad_body``.
    """

    default_reason = Reason.BAD_BODY


# --- media --------------------------------------------------------------------------------
class MediaError(RemoteProtocolError):
    """A media manifest, chunk or transfer was rejected."""


# --- fleet: enrolment and updates ----------------------------------------------------------
class FleetError(RemoteProtocolError):
    """An enrolment or update message or package was refused (:mod:`sealmq.enrol`,
    :mod:`sealmq.update`)."""

    default_reason = Reason.BAD_BODY


# --- transport ----------------------------------------------------------------------------
class TransportError(SealmqError):
    """The MQTT transport failed (not reachable, not authorised)."""

    default_reason = Reason.TRANSPORT_FAILED
