"""Enrolment bodies (docs/protocol.md section 7.2): the CSR a device sends in an ENROL_REQUEST record
and the certificate chain (or refusal) the backend answers with in an ENROL_RESPONSE record.

Both travel sealed; the broker sees neither the CSR nor the certificate. The same exchange serves
zero-touch enrolment (over a session authenticated with a claim certificate) and renewal (over
the device's live session). This module only encodes and strictly decodes; the CSR policy is the
CA's (``pki.issue.check_csr``) and the claim policy the backend's. Bad input raises
:class:`~sealmq.errors.FleetError` (reason ``bad_body``, or the CBOR reason).

    enrol-request  = [ req-id, csr: bstr ]                      ; DER PKCS#10
    enrol-response = [ req-id, true, chain: [ 1*4 bstr ] ]      ; DER, leaf first
                   / [ req-id, false, reason: tstr ]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sealmq import cbor
from sealmq.errors import DecodeError, FleetError, LocalProtocolError, Reason

MAX_REQ_ID = 2**32 - 1
MAX_CSR = 16 * 1024  # DER; an RSA-3072 CSR is about 1 KiB
MAX_CERT = 8 * 1024
MAX_CHAIN = 4
MAX_REASON = 64


def _load(data: bytes, what: str) -> Any:
    try:
        return cbor.loads(data)
    except DecodeError as exc:
        raise FleetError(exc.reason, f"{what}: {exc.detail}") from None


def _req_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REQ_ID:
        raise FleetError(Reason.BAD_BODY, f"req-id must be an integer 0..{MAX_REQ_ID}")
    return value


def _bstr(value: Any, what: str, max_len: int) -> bytes:
    if not isinstance(value, bytes) or not 1 <= len(value) <= max_len:
        raise FleetError(Reason.BAD_BODY, f"{what} must be a byte string of 1..{max_len} bytes")
    return value


@dataclass(frozen=True, slots=True)
class EnrolRequest:
    req_id: int
    csr_der: bytes

    def encode(self) -> bytes:
        try:
            _req_id(self.req_id)
            _bstr(self.csr_der, "csr", MAX_CSR)
        except FleetError as exc:
            raise LocalProtocolError(Reason.BAD_BODY, exc.detail) from None
        return cbor.dumps([self.req_id, self.csr_der])

    def __repr__(self) -> str:
        return f"EnrolRequest(req_id={self.req_id}, csr={len(self.csr_der)} bytes)"


def decode_request(data: bytes) -> EnrolRequest:
    item = _load(data, "enrol request")
    if not isinstance(item, list) or len(item) != 2:
        raise FleetError(Reason.BAD_BODY, "enrol request must be [req-id, csr]")
    return EnrolRequest(_req_id(item[0]), _bstr(item[1], "csr", MAX_CSR))


@dataclass(frozen=True, slots=True)
class EnrolResponse:
    """``chain`` (DER, leaf first) when ``ok``, else ``reason`` (a :class:`Reason` value)."""

    req_id: int
    ok: bool
    chain: tuple[bytes, ...] = ()
    reason: str = ""

    @classmethod
    def issued(cls, req_id: int, chain: list[bytes]) -> EnrolResponse:
        return cls(req_id, True, tuple(chain))

    @classmethod
    def refused(cls, req_id: int, reason: str) -> EnrolResponse:
        return cls(req_id, False, (), reason[:MAX_REASON])

    def encode(self) -> bytes:
        try:
            _req_id(self.req_id)
            if self.ok:
                _chain(list(self.chain))
            elif not isinstance(self.reason, str) or len(self.reason.encode()) > MAX_REASON:
                raise FleetError(Reason.BAD_BODY, "reason too long")
        except FleetError as exc:
            raise LocalProtocolError(Reason.BAD_BODY, exc.detail) from None
        return cbor.dumps([self.req_id, True, list(self.chain)] if self.ok else [self.req_id, False, self.reason])


def _chain(value: Any) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHAIN:
        raise FleetError(Reason.BAD_BODY, f"chain must be 1..{MAX_CHAIN} certificates")
    return tuple(_bstr(c, "certificate", MAX_CERT) for c in value)


def decode_response(data: bytes) -> EnrolResponse:
    item = _load(data, "enrol response")
    if not isinstance(item, list) or len(item) != 3 or not isinstance(item[1], bool):
        raise FleetError(Reason.BAD_BODY, "enrol response must be [req-id, ok, chain-or-reason]")
    req_id = _req_id(item[0])
    if item[1]:
        return EnrolResponse(req_id, True, _chain(item[2]))
    reason = item[2]
    if not isinstance(reason, str) or len(reason.encode("utf-8", "surrogatepass")) > MAX_REASON:
        raise FleetError(Reason.BAD_BODY, f"reason must be a text of at most {MAX_REASON} bytes")
    return EnrolResponse(req_id, False, (), reason)
