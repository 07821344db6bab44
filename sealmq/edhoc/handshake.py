"""The EDHOC handshake (RFC 9528) as two sans-IO state machines: :class:`Initiator` (the
device) and :class:`Responder` (the backend).

Each public method is one input of a transition table (``_INITIATOR_TABLE`` /
``_RESPONDER_TABLE``); calling a method in a state where the table has no entry is a
:class:`~sealmq.errors.LocalProtocolError`. Any exception leaves the object dead: secrets
are dropped and every further call raises ``LocalProtocolError``. The only exception to
"dead on error" is :meth:`Initiator.process_error` with ERR_CODE 2 (cipher-suite
negotiation), which returns a fresh message_1 for a suite both sides support.

Randomness is injected: the ephemeral private key is an argument (so the RFC 9529 traces
replay), or it is drawn from a ``random_bytes`` callable the caller supplies.

Methods 0..3 are all computed here; which side signs and which side uses static DH
follows RFC 9528 Table 2. Method 0 (signature/signature) is the one sealmq deploys.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from sealmq import cbor, cose, kdf
from sealmq.edhoc.credentials import AuthenticatedPeer, AuthKind, LocalCredential, PeerAuthenticator
from sealmq.edhoc.suites import DEFAULT_SUITES, Suite, exchange, generate_ephemeral, get_suite
from sealmq.edhoc.wire import (
    ERR_UNKNOWN_CREDENTIAL,
    ERR_WRONG_SUITE,
    MAX_CONN_ID_LEN,
    EadItem,
    IdCred,
    decode_ead,
    decode_error_message,
    decode_id_cred,
    decode_message_1,
    decode_plaintext_2,
    decode_plaintext_3,
    decode_plaintext_4,
    decode_single_bstr,
    encode_ead,
    encode_identifier,
    encode_message_1,
)
from sealmq.errors import DecodeError, DecryptError, EdhocError, LocalProtocolError, PkiError, Reason, SealmqError

# EDHOC_KDF labels (RFC 9528 4.1.2).
_KEYSTREAM_2, _SALT_3E2M, _MAC_2, _K_3, _IV_3, _SALT_4E3M, _MAC_3, _PRK_OUT, _K_4, _IV_4 = range(10)

METHODS = (0, 1, 2, 3)

RESPONDER_SNAPSHOT_VERSION = 1  # first element of Responder.to_bytes(); docs/protocol.md section 12

RandomBytes = Callable[[int], bytes]
EadInput = Sequence[EadItem | tuple[int, bytes | None]]


def initiator_signs(method: int) -> bool:
    return method in (0, 1)


def responder_signs(method: int) -> bool:
    return method in (0, 2)


@dataclass(frozen=True)
class EdhocResult:
    """What a completed handshake hands to the record layer. Only ``prk_out`` is secret."""

    prk_out: bytes = field(repr=False)
    suite: int
    hash_name: str
    c_i: bytes  # connection ids as OSCORE ids (an int C_x is its one-byte CBOR encoding)
    c_r: bytes
    peer: AuthenticatedPeer
    ead: Mapping[int, tuple[EadItem, ...]]  # EAD received from the peer, by message number
    method: int
    app_aead: int  # COSE alg, 10 = AES-CCM-16-64-128
    app_hash: str

    def exporter(self, label: int, context: bytes, length: int) -> bytes:
        return kdf.exporter(self.prk_out, label, context, length, self.hash_name)

    def key_update(self, context: bytes) -> EdhocResult:
        """EDHOC_KeyUpdate (RFC 9528 Appendix H): the same session with PRK_out replaced."""
        return _replace_prk(self, kdf.key_update(self.prk_out, context, self.hash_name))

    def oscore_master_secret(self, length: int = 16) -> bytes:
        return self.exporter(kdf.EXPORTER_OSCORE_MASTER_SECRET, b"", length)

    def oscore_master_salt(self, length: int = 8) -> bytes:
        return self.exporter(kdf.EXPORTER_OSCORE_MASTER_SALT, b"", length)


def _replace_prk(result: EdhocResult, prk_out: bytes) -> EdhocResult:
    return replace(result, prk_out=prk_out)


@dataclass(frozen=True)
class Message1Info:
    """What the responder learned from message_1 (nothing is authenticated yet)."""

    method: int
    suite: int
    c_i: bytes
    ead_1: tuple[EadItem, ...]


@dataclass(frozen=True)
class Message2Info:
    c_r: bytes
    peer: AuthenticatedPeer
    ead_2: tuple[EadItem, ...]


@dataclass(frozen=True)
class Message3Info:
    peer: AuthenticatedPeer
    ead_3: tuple[EadItem, ...]
    id_cred_i: IdCred  # as the initiator sent it: what authenticates the same credential again


class State(Enum):
    START = "start"
    WAIT_M2 = "wait_message_2"
    M2_VERIFIED = "message_2_verified"
    M1_RECEIVED = "message_1_received"
    WAIT_M3 = "wait_message_3"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"  # message_4 sent / received
    FAILED = "failed"


class Input(Enum):
    SEND_M1 = "send_message_1"
    RECV_M1 = "receive_message_1"
    SEND_M2 = "send_message_2"
    RECV_M2 = "receive_message_2"
    SEND_M3 = "send_message_3"
    RECV_M3 = "receive_message_3"
    SEND_M4 = "send_message_4"
    RECV_M4 = "receive_message_4"
    RECV_ERROR = "receive_error"


_INITIATOR_TABLE: dict[tuple[State, Input], State] = {
    (State.START, Input.SEND_M1): State.WAIT_M2,
    (State.WAIT_M2, Input.RECV_M2): State.M2_VERIFIED,
    (State.WAIT_M2, Input.RECV_ERROR): State.WAIT_M2,  # only ERR_CODE 2 with a common suite survives
    (State.COMPLETED, Input.RECV_M4): State.CONFIRMED,
    (State.COMPLETED, Input.RECV_ERROR): State.FAILED,  # responder rejected message_3
    (State.M2_VERIFIED, Input.SEND_M3): State.COMPLETED,
}

_RESPONDER_TABLE: dict[tuple[State, Input], State] = {
    (State.START, Input.RECV_M1): State.M1_RECEIVED,
    (State.M1_RECEIVED, Input.SEND_M2): State.WAIT_M3,
    (State.WAIT_M3, Input.RECV_M3): State.COMPLETED,
    (State.WAIT_M3, Input.RECV_ERROR): State.FAILED,  # initiator rejected message_2
    (State.COMPLETED, Input.SEND_M4): State.CONFIRMED,
}


class _Party:
    """What both roles share: state handling, the transcript hash and the key schedule."""

    _table: dict[tuple[State, Input], State]

    def __init__(
        self,
        authenticator: PeerAuthenticator,
        *,
        ephemeral_key: bytes | None,
        random_bytes: RandomBytes | None,
        known_ead_labels: frozenset[int],
        debug: bool,
    ) -> None:
        self.authenticator = authenticator
        self._ephemeral_key = ephemeral_key
        self._random_bytes = random_bytes
        self.known_ead_labels = frozenset(known_ead_labels)
        self.state = State.START
        # Intermediate values named as in RFC 9529 (TH_2, PRK_2e, MAC_2...). Secrets: opt-in only.
        self.debug = debug
        self.transcript: dict[str, bytes] = {}
        self._suite: Suite | None = None
        self._method = 0
        self._c_i = b""
        self._c_r = b""
        self._peer: AuthenticatedPeer | None = None
        self._ead_received: dict[int, tuple[EadItem, ...]] = {}
        self._th = b""
        self._prk_2e = b""
        self._prk_3e2m = b""
        self._prk_4e3m = b""
        self._prk_out = b""
        self._private = b""  # our ephemeral private key for this attempt
        self._peer_ephemeral = b""

    # --- state machine -------------------------------------------------------------------

    @contextmanager
    def _step(self, event: Input) -> Iterator[None]:
        key = (self.state, event)
        if self.state is State.FAILED:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "handshake already failed")
        if key not in self._table:
            self._fail()
            raise LocalProtocolError(
                Reason.UNEXPECTED_MESSAGE, f"{event.value} not allowed in {self.state.value}"
            )
        try:
            yield
        except BaseException:
            self._fail()
            raise
        self.state = self._table[key]

    def _fail(self) -> None:
        self.state = State.FAILED
        self._prk_2e = self._prk_3e2m = self._prk_4e3m = self._prk_out = self._private = b""
        self._peer = None
        self.transcript.clear()

    def _log(self, name: str, value: bytes) -> None:
        if self.debug:
            self.transcript[name] = value

    @property
    def c_i(self) -> bytes | None:
        """C_I as a byte string (the responder's OSCORE Sender ID), once known."""
        return self._c_i or None

    @property
    def c_r(self) -> bytes | None:
        """C_R as a byte string (the initiator's OSCORE Sender ID), once known."""
        return self._c_r or None

    @property
    def c_i_item(self) -> bytes | None:
        """C_I as the CBOR item on the wire (int or bstr): the RFC 9528 A.2 style prefix."""
        return None if not self._c_i else cbor.dumps(encode_identifier(self._c_i))

    @property
    def c_r_item(self) -> bytes | None:
        return None if not self._c_r else cbor.dumps(encode_identifier(self._c_r))

    @property
    def suite(self) -> Suite:
        if self._suite is None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "no cipher suite selected yet")
        return self._suite

    def result(self) -> EdhocResult:
        """The session keys; only after a successful handshake (COMPLETED or CONFIRMED)."""
        if self.state not in (State.COMPLETED, State.CONFIRMED) or self._peer is None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"no result in state {self.state.value}")
        s = self.suite
        return EdhocResult(
            prk_out=self._prk_out,
            suite=s.ident,
            hash_name=s.hash_name,
            c_i=self._c_i,
            c_r=self._c_r,
            peer=self._peer,
            ead=dict(self._ead_received),
            method=self._method,
            app_aead=s.app_aead,
            app_hash=s.app_hash,
        )

    # --- key schedule ----------------------------------------------------------------------

    def _hash(self, data: bytes) -> bytes:
        return kdf.hash_bytes(data, self.suite.hash_name)

    def _kdf(self, prk: bytes, label: int, context: bytes, length: int) -> bytes:
        return kdf.edhoc_kdf(prk, label, context, length, self.suite.hash_name)

    def _extract(self, salt: bytes, ikm: bytes) -> bytes:
        return kdf.hkdf_extract(salt, ikm, self.suite.hash_name)

    def _take_ephemeral(self, override: bytes | None) -> bytes:
        key = override if override is not None else self._ephemeral_key
        self._ephemeral_key = None  # an ephemeral key is used for one attempt only
        if key is None:
            if self._random_bytes is None:
                raise LocalProtocolError(Reason.CONFIG_INVALID, "no ephemeral key and no random_bytes source")
            key = generate_ephemeral(self.suite, self._random_bytes)
        return key

    def _authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        return authenticate(self.authenticator, id_cred)

    def _static_dh_with_peer(self, peer: AuthenticatedPeer) -> bytes:
        """ECDH of our ephemeral key with the peer's static DH key (G_RX or G_IY)."""
        s = self.suite
        return exchange(s.private_key_from_bytes(self._private), peer.public_key)

    def _mac_length(self, signer: bool) -> int:
        return self.suite.hash_length if signer else self.suite.mac_length

    def _signature_or_mac(
        self, *, credential: LocalCredential, signs: bool, id_cred: IdCred, th: bytes, ead: bytes, mac: bytes
    ) -> bytes:
        if not signs:
            return mac
        return credential.sign(self.suite, _sig_structure(id_cred, th, credential.cred, ead, mac))

    def _check_signature_or_mac(
        self,
        *,
        peer: AuthenticatedPeer,
        signs: bool,
        id_cred: IdCred,
        th: bytes,
        ead: bytes,
        mac: bytes,
        got: bytes,
    ) -> None:
        if signs:
            self.suite.verify(peer.public_key, _sig_structure(id_cred, th, peer.cred, ead, mac), got)
        elif not hmac.compare_digest(mac, got):
            raise EdhocError(Reason.MAC_FAILED, "MAC does not verify")

    def _ead(self, items: Sequence[Any], message: int) -> tuple[tuple[EadItem, ...], bytes]:
        parsed = decode_ead(items, self.known_ead_labels)
        self._ead_received[message] = parsed
        return parsed, cbor.dumps_seq(*items)

    def _aead_keys(self, prk: bytes, label_k: int, label_iv: int, th: bytes) -> tuple[bytes, bytes, bytes]:
        s = self.suite
        key = self._kdf(prk, label_k, th, s.key_length)
        iv = self._kdf(prk, label_iv, th, s.iv_length)
        aad = cbor.dumps(["Encrypt0", b"", th])
        return key, iv, aad

    def _decrypt(self, key: bytes, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self.suite.decrypt(key, iv, ciphertext, aad)
        except DecryptError:
            raise EdhocError(Reason.MAC_FAILED, "message does not decrypt") from None

    def _finish(self, th_prev: bytes, plaintext: bytes, cred: bytes, name: str) -> None:
        """TH_4 and PRK_out (shared tail of message_3 on both sides)."""
        th_4 = self._hash(cbor.dumps(th_prev) + plaintext + cred)
        self._th = th_4
        self._log(name, th_4)
        self._prk_out = self._kdf(self._prk_4e3m, _PRK_OUT, th_4, self.suite.hash_length)
        self._log("PRK_out", self._prk_out)


def authenticate(authenticator: PeerAuthenticator, id_cred: IdCred) -> AuthenticatedPeer:
    """``authenticator.authenticate(id_cred)``, its failures as ``EdhocError`` (a PKI reason kept)."""
    try:
        return authenticator.authenticate(id_cred)
    except EdhocError:
        raise
    except PkiError as exc:
        raise EdhocError(exc.reason, "peer credential rejected") from exc
    except SealmqError as exc:
        raise EdhocError(Reason.UNKNOWN_CREDENTIAL, f"peer credential rejected ({exc.reason.value})") from exc


def _sig_structure(id_cred: IdCred, th: bytes, cred: bytes, ead: bytes, mac: bytes) -> bytes:
    # COSE_Sign1 Sig_structure with external_aad = << TH_x, CRED_x, ? EAD_x >> (RFC 9528 5.3.2).
    return cose.sig_structure(id_cred.encoded, cbor.dumps(th) + cred + ead, mac)


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("xor of byte strings of different lengths")
    # as integers: one C operation instead of a Python step per byte (a PLAINTEXT_2 with a
    # certificate is about 500 bytes)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def connection_id(value: bytes | int) -> bytes:
    """A C_x given as bytes, or as an int -24..23 meaning the one-byte id that CBOR-encodes to it."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -24 <= value <= 23:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "an int connection id must be in -24..23")
        return cbor.dumps(value)
    raw = bytes(value)
    if not 0 < len(raw) <= MAX_CONN_ID_LEN:
        raise LocalProtocolError(Reason.CONFIG_INVALID, f"connection id must be 1..{MAX_CONN_ID_LEN} bytes")
    return raw


def _responder_credential(credentials: Sequence[LocalCredential], suite: Suite, method: int) -> LocalCredential | None:
    want = AuthKind.SIGNATURE if responder_signs(method) else AuthKind.STATIC_DH
    for cred in credentials:
        if cred.kind is want and cred.supports(suite):
            return cred
    return None


def responder_suites(credentials: Sequence[LocalCredential], suites: Sequence[int], method: int) -> list[int]:
    """The suites of ``suites`` (kept in order) a responder holding ``credentials`` serves for
    ``method``: those some credential of the method's kind fits (its SUITES_R)."""
    return [s for s in suites if _responder_credential(credentials, get_suite(s), method) is not None]


def _check_method(method: int) -> None:
    if method not in METHODS:
        raise LocalProtocolError(Reason.UNSUPPORTED_METHOD, f"method {method} does not exist")


class Initiator(_Party):
    """The device side: sends message_1 and message_3, receives message_2 (and message_4)."""

    _table = _INITIATOR_TABLE

    def __init__(
        self,
        credential: LocalCredential,
        authenticator: PeerAuthenticator,
        *,
        c_i: bytes | int,
        suites: Sequence[int] = DEFAULT_SUITES,
        method: int = 0,
        ephemeral_key: bytes | None = None,
        random_bytes: RandomBytes | None = None,
        known_ead_labels: frozenset[int] = frozenset(),
        debug: bool = False,
    ) -> None:
        super().__init__(
            authenticator,
            ephemeral_key=ephemeral_key,
            random_bytes=random_bytes,
            known_ead_labels=known_ead_labels,
            debug=debug,
        )
        _check_method(method)
        want = AuthKind.SIGNATURE if initiator_signs(method) else AuthKind.STATIC_DH
        if credential.kind is not want:
            raise LocalProtocolError(
                Reason.UNSUPPORTED_METHOD, f"method {method} needs a {want.value} credential"
            )
        if not suites:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "no cipher suites")
        self.suites = tuple(get_suite(s).ident for s in suites)  # preference order
        # Only "some suite fits" here: RFC 9529 trace 2 offers a suite (6) its P-256 static key
        # cannot serve; a suite the credential does not fit fails when it would be used.
        if not any(credential.supports(get_suite(s)) for s in self.suites):
            raise LocalProtocolError(
                Reason.UNSUPPORTED_ALGORITHM, "credential fits none of the offered suites"
            )
        self.credential = credential
        self._method = method
        self._c_i = connection_id(c_i)
        self._offered: tuple[int, ...] = self.suites[:1]
        self._message_1 = b""
        self._ead_1: tuple[EadItem | tuple[int, bytes | None], ...] = ()

    # --- message_1 -----------------------------------------------------------------------

    def create_message_1(self, ead_1: EadInput = ()) -> bytes:
        with self._step(Input.SEND_M1):
            return self._message_1_for(self._offered, ead_1, None)

    def _message_1_for(self, offered: tuple[int, ...], ead_1: EadInput, ephemeral_key: bytes | None) -> bytes:
        self._suite = get_suite(offered[-1])
        self._private = self._take_ephemeral(ephemeral_key)
        g_x = self.suite.ephemeral_public(self._private)
        self._ead_1 = tuple(ead_1)
        msg = encode_message_1(self._method, offered, g_x, self._c_i, encode_ead(self._ead_1))
        self._message_1 = msg
        self._log("message_1", msg)
        return msg

    def process_error(
        self, data: bytes, *, ephemeral_key: bytes | None = None, c_i: bytes | int | None = None
    ) -> bytes:
        """Handle an EDHOC error received instead of message_2 (or message_4).

        ERR_CODE 2 whose SUITES_R shares a suite with ours: returns the new message_1 (with a
        fresh ephemeral key, from ``ephemeral_key`` or ``random_bytes``). Everything else
        raises ``EdhocError`` (``PEER_ERROR``, or ``UNSUPPORTED_SUITE`` when nothing is common).
        """
        with self._step(Input.RECV_ERROR):
            err = decode_error_message(data)
            if self.state is not State.WAIT_M2 or err.err_code != ERR_WRONG_SUITE or err.suites_r is None:
                reason = (
                    Reason.UNKNOWN_CREDENTIAL if err.err_code == ERR_UNKNOWN_CREDENTIAL else Reason.PEER_ERROR
                )
                raise EdhocError(reason, f"peer sent ERR_CODE {err.err_code}")
            common = [s for s in self.suites if s in err.suites_r]
            if not common:
                raise EdhocError(Reason.UNSUPPORTED_SUITE, "no cipher suite in common with the responder")
            selected = common[0]
            if selected in self._offered:
                # We already offered the suite it claims to want: a loop, or a downgrade game.
                raise EdhocError(Reason.UNSUPPORTED_SUITE, "responder rejected a suite it lists as supported")
            # RFC 9528 6.3.2: SUITES_I = our suites in preference order, up to the selected one.
            offered = self.suites[: self.suites.index(selected) + 1]
            self._offered = offered
            if c_i is not None:
                self._c_i = connection_id(c_i)
            return self._message_1_for(offered, self._ead_1, ephemeral_key)

    # --- message_2 -----------------------------------------------------------------------

    def process_message_2(self, data: bytes) -> Message2Info:
        with self._step(Input.RECV_M2):
            s = self.suite
            payload = decode_single_bstr(data, "G_Y_CIPHERTEXT_2")
            if len(payload) <= s.point_length:
                raise EdhocError(Reason.MALFORMED, "message_2 too short")
            g_y, ciphertext_2 = payload[: s.point_length], payload[s.point_length :]
            self._peer_ephemeral = g_y
            g_xy = s.ecdh(self._private, g_y)
            th_2 = self._hash(cbor.dumps(g_y) + cbor.dumps(self._hash(self._message_1)))
            self._log("TH_2", th_2)
            self._prk_2e = self._extract(th_2, g_xy)
            self._log("PRK_2e", self._prk_2e)
            keystream = self._kdf(self._prk_2e, _KEYSTREAM_2, th_2, len(ciphertext_2))
            self._log("KEYSTREAM_2", keystream)
            plaintext_2 = _xor(ciphertext_2, keystream)
            self._log("PLAINTEXT_2", plaintext_2)
            pt = decode_plaintext_2(plaintext_2)
            if pt.c_r == self._c_i:
                raise EdhocError(Reason.CONNECTION_ID_IN_USE, "C_R equals C_I")
            ead_2, ead_bytes = self._ead(pt.ead_items, 2)
            peer = self._authenticate(pt.id_cred_r)
            if responder_signs(self._method):
                self._prk_3e2m = self._prk_2e
            else:
                salt = self._kdf(self._prk_2e, _SALT_3E2M, th_2, s.hash_length)
                self._prk_3e2m = self._extract(salt, self._static_dh_with_peer(peer))
            self._log("PRK_3e2m", self._prk_3e2m)
            signs = responder_signs(self._method)
            context_2 = (
                cbor.dumps(encode_identifier(pt.c_r))
                + pt.id_cred_r.encoded
                + cbor.dumps(th_2)
                + (peer.cred + ead_bytes)
            )
            mac_2 = self._kdf(self._prk_3e2m, _MAC_2, context_2, self._mac_length(signs))
            self._log("MAC_2", mac_2)
            self._check_signature_or_mac(
                peer=peer,
                signs=signs,
                id_cred=pt.id_cred_r,
                th=th_2,
                ead=ead_bytes,
                mac=mac_2,
                got=pt.signature_or_mac,
            )
            self._th = self._hash(cbor.dumps(th_2) + plaintext_2 + peer.cred)
            self._log("TH_3", self._th)
            self._c_r = pt.c_r
            self._peer = peer
            self._private = b""  # forward secrecy: X is not needed any more
            return Message2Info(pt.c_r, peer, ead_2)

    # --- message_3 -----------------------------------------------------------------------

    def create_message_3(self, ead_3: EadInput = ()) -> bytes:
        with self._step(Input.SEND_M3):
            s = self.suite
            if not self.credential.supports(s):
                raise LocalProtocolError(
                    Reason.UNSUPPORTED_ALGORITHM, f"credential does not fit suite {s.ident}"
                )
            th_3 = self._th
            if initiator_signs(self._method):
                self._prk_4e3m = self._prk_3e2m
            else:
                salt = self._kdf(self._prk_3e2m, _SALT_4E3M, th_3, s.hash_length)
                self._prk_4e3m = self._extract(salt, self.credential.static_dh(s, self._peer_ephemeral))
            self._log("PRK_4e3m", self._prk_4e3m)
            signs = initiator_signs(self._method)
            id_cred = self.credential.id_cred
            ead_bytes = cbor.dumps_seq(*encode_ead(ead_3))
            context_3 = id_cred.encoded + cbor.dumps(th_3) + self.credential.cred + ead_bytes
            mac_3 = self._kdf(self._prk_4e3m, _MAC_3, context_3, self._mac_length(signs))
            self._log("MAC_3", mac_3)
            sig = self._signature_or_mac(
                credential=self.credential, signs=signs, id_cred=id_cred, th=th_3, ead=ead_bytes, mac=mac_3
            )
            self._log("Signature_or_MAC_3", sig)
            plaintext_3 = cbor.dumps_seq(id_cred.compact(), sig) + ead_bytes
            self._log("PLAINTEXT_3", plaintext_3)
            key, iv, aad = self._aead_keys(self._prk_3e2m, _K_3, _IV_3, th_3)
            self._log("K_3", key)
            self._log("IV_3", iv)
            message_3 = cbor.dumps(s.encrypt(key, iv, plaintext_3, aad))
            self._log("message_3", message_3)
            self._finish(th_3, plaintext_3, self.credential.cred, "TH_4")
            return message_3

    # --- message_4 -----------------------------------------------------------------------

    def process_message_4(self, data: bytes) -> tuple[EadItem, ...]:
        """Key confirmation from the responder; returns EAD_4."""
        with self._step(Input.RECV_M4):
            ciphertext_4 = decode_single_bstr(data, "CIPHERTEXT_4")
            key, iv, aad = self._aead_keys(self._prk_4e3m, _K_4, _IV_4, self._th)
            plaintext_4 = self._decrypt(key, iv, ciphertext_4, aad)
            ead_4, _ = self._ead(decode_plaintext_4(plaintext_4), 4)
            return ead_4


class Responder(_Party):
    """The backend side: receives message_1 and message_3, sends message_2 (and message_4).

    ``credentials`` may hold several local credentials (e.g. an ECDSA one for suite 2 and an
    RSA one for suite -24): the first that fits the selected suite and method is used.
    """

    _table = _RESPONDER_TABLE

    def __init__(
        self,
        credentials: LocalCredential | Sequence[LocalCredential],
        authenticator: PeerAuthenticator,
        *,
        c_r: bytes | int,
        suites: Sequence[int] = DEFAULT_SUITES,
        methods: Sequence[int] = (0,),
        ephemeral_key: bytes | None = None,
        random_bytes: RandomBytes | None = None,
        known_ead_labels: frozenset[int] = frozenset(),
        debug: bool = False,
    ) -> None:
        super().__init__(
            authenticator,
            ephemeral_key=ephemeral_key,
            random_bytes=random_bytes,
            known_ead_labels=known_ead_labels,
            debug=debug,
        )
        self.credentials: tuple[LocalCredential, ...] = (
            tuple(credentials) if isinstance(credentials, Sequence) else (credentials,)
        )
        for m in methods:
            _check_method(m)
        self.methods = frozenset(methods)
        self.suites = tuple(get_suite(s).ident for s in suites)
        self._c_r = connection_id(c_r)
        self._credential: LocalCredential | None = None
        self._h_message_1 = b""

    def supported_suites(self, method: int) -> list[int]:
        """SUITES_R for ``method``: our suites (in preference order) that some credential fits."""
        return responder_suites(self.credentials, self.suites, method)

    def _credential_for(self, suite: Suite, method: int) -> LocalCredential | None:
        return _responder_credential(self.credentials, suite, method)

    # --- message_1 -----------------------------------------------------------------------

    def process_message_1(self, data: bytes) -> Message1Info:
        """Parse and check message_1. An unsupported selected suite raises ``EdhocError``
        with ``err_code=2`` and ``suites_r``: send ``encode_error(err)`` back."""
        with self._step(Input.RECV_M1):
            m1 = decode_message_1(data)
            if m1.method not in self.methods:
                raise EdhocError(Reason.UNSUPPORTED_METHOD, f"method {m1.method} not accepted")
            ours = self.supported_suites(m1.method)
            selected = m1.selected_suite
            # RFC 9528 5.2.3: the selected suite must be ours, and no suite the initiator
            # prefers to it may be ours either (or an attacker could have downgraded us).
            if selected not in ours or any(s in ours for s in m1.suites_i[:-1]):
                raise EdhocError(
                    Reason.UNSUPPORTED_SUITE, f"selected suite {selected} refused", err_code=2, suites_r=ours
                )
            self._suite = get_suite(selected)
            self._credential = self._credential_for(self._suite, m1.method)
            self._suite.load_public(m1.g_x)  # reject bad points before any state is kept
            ead_1, _ = self._ead(m1.ead_items, 1)
            self._method = m1.method
            self._c_i = m1.c_i
            self._peer_ephemeral = m1.g_x
            self._h_message_1 = self._hash(data)
            self._log("H(message_1)", self._h_message_1)
            return Message1Info(m1.method, selected, m1.c_i, ead_1)

    # --- message_2 -----------------------------------------------------------------------

    def create_message_2(
        self, ead_2: EadInput = (), *, c_r: bytes | int | None = None, ephemeral_key: bytes | None = None
    ) -> bytes:
        with self._step(Input.SEND_M2):
            s = self.suite
            cred = self._credential
            if cred is None:  # pragma: no cover - excluded by the transition table
                raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "no credential selected")
            if c_r is not None:
                self._c_r = connection_id(c_r)
            if self._c_r == self._c_i:
                raise LocalProtocolError(Reason.CONNECTION_ID_IN_USE, "C_R must differ from C_I")
            self._private = self._take_ephemeral(ephemeral_key)
            g_y, g_xy = s.ephemeral_public_and_ecdh(self._private, self._peer_ephemeral)
            th_2 = self._hash(cbor.dumps(g_y) + cbor.dumps(self._h_message_1))
            self._log("TH_2", th_2)
            self._prk_2e = self._extract(th_2, g_xy)
            self._log("PRK_2e", self._prk_2e)
            signs = responder_signs(self._method)
            if signs:
                self._prk_3e2m = self._prk_2e
            else:
                salt = self._kdf(self._prk_2e, _SALT_3E2M, th_2, s.hash_length)
                self._prk_3e2m = self._extract(salt, cred.static_dh(s, self._peer_ephemeral))
            self._log("PRK_3e2m", self._prk_3e2m)
            ead_bytes = cbor.dumps_seq(*encode_ead(ead_2))
            c_r_item = cbor.dumps(encode_identifier(self._c_r))
            context_2 = c_r_item + cred.id_cred.encoded + cbor.dumps(th_2) + cred.cred + ead_bytes
            mac_2 = self._kdf(self._prk_3e2m, _MAC_2, context_2, self._mac_length(signs))
            self._log("MAC_2", mac_2)
            sig = self._signature_or_mac(
                credential=cred, signs=signs, id_cred=cred.id_cred, th=th_2, ead=ead_bytes, mac=mac_2
            )
            self._log("Signature_or_MAC_2", sig)
            plaintext_2 = c_r_item + cbor.dumps_seq(cred.id_cred.compact(), sig) + ead_bytes
            self._log("PLAINTEXT_2", plaintext_2)
            keystream = self._kdf(self._prk_2e, _KEYSTREAM_2, th_2, len(plaintext_2))
            self._log("KEYSTREAM_2", keystream)
            message_2 = cbor.dumps(g_y + _xor(plaintext_2, keystream))
            self._log("message_2", message_2)
            self._th = self._hash(cbor.dumps(th_2) + plaintext_2 + cred.cred)
            self._log("TH_3", self._th)
            return message_2

    # --- message_3 -----------------------------------------------------------------------

    def process_message_3(self, data: bytes) -> Message3Info:
        with self._step(Input.RECV_M3):
            s = self.suite
            th_3 = self._th
            ciphertext_3 = decode_single_bstr(data, "CIPHERTEXT_3")
            key, iv, aad = self._aead_keys(self._prk_3e2m, _K_3, _IV_3, th_3)
            plaintext_3 = self._decrypt(key, iv, ciphertext_3, aad)
            self._log("PLAINTEXT_3", plaintext_3)
            pt = decode_plaintext_3(plaintext_3)
            ead_3, ead_bytes = self._ead(pt.ead_items, 3)
            peer = self._authenticate(pt.id_cred_i)
            signs = initiator_signs(self._method)
            if signs:
                self._prk_4e3m = self._prk_3e2m
            else:
                salt = self._kdf(self._prk_3e2m, _SALT_4E3M, th_3, s.hash_length)
                self._prk_4e3m = self._extract(salt, self._static_dh_with_peer(peer))
            self._log("PRK_4e3m", self._prk_4e3m)
            context_3 = pt.id_cred_i.encoded + cbor.dumps(th_3) + peer.cred + ead_bytes
            mac_3 = self._kdf(self._prk_4e3m, _MAC_3, context_3, self._mac_length(signs))
            self._log("MAC_3", mac_3)
            self._check_signature_or_mac(
                peer=peer,
                signs=signs,
                id_cred=pt.id_cred_i,
                th=th_3,
                ead=ead_bytes,
                mac=mac_3,
                got=pt.signature_or_mac,
            )
            self._finish(th_3, plaintext_3, peer.cred, "TH_4")
            self._peer = peer
            self._private = b""  # forward secrecy: Y is not needed any more
            return Message3Info(peer, ead_3, pt.id_cred_i)

    # --- snapshot after message_2 (a half-open handshake another process may finish) ----------

    def to_bytes(self) -> bytes:
        """What :meth:`process_message_3` (and :meth:`create_message_4`) need, as deterministic CBOR
        (``responder-snapshot``, docs/protocol.md section 12); only while waiting for message_3.

        Holds PRK_3e2m and, for methods 2 and 3, the ephemeral private key Y (the initiator's static
        DH key meets it in message_3): store it only sealed. Never holds our private keys: the
        importer has its own credentials, the snapshot only names (by ID_CRED_R) the one message_2 used.
        """
        if self.state is not State.WAIT_M3 or self._credential is None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"no snapshot in state {self.state.value}")
        y = b"" if initiator_signs(self._method) else self._private
        return cbor.dumps([RESPONDER_SNAPSHOT_VERSION, self._method, self.suite.ident, self._c_i, self._c_r,
                           self._th, self._prk_3e2m, y, self._credential.id_cred.compact(),
                           encode_ead(self._ead_received.get(1, ()))])

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        credentials: LocalCredential | Sequence[LocalCredential],
        authenticator: PeerAuthenticator,
        *,
        suites: Sequence[int] = DEFAULT_SUITES,
        methods: Sequence[int] = (0,),
        known_ead_labels: frozenset[int] = frozenset(),
        debug: bool = False,
    ) -> Responder:
        """A responder waiting for message_3, from :meth:`to_bytes` and this process's own
        ``credentials`` (which must hold the one message_2 used) and ``authenticator``.

        The method and suite must be ones this responder serves. Anything invalid raises
        :class:`~sealmq.errors.DecodeError` with a reason, never another exception.
        """
        try:
            return cls._restore(data, credentials, authenticator, suites=suites, methods=methods,
                                known_ead_labels=known_ead_labels, debug=debug)
        except DecodeError:
            raise
        except SealmqError as exc:
            raise DecodeError(exc.reason, f"handshake snapshot: {exc.detail}") from None

    @classmethod
    def _restore(
        cls,
        data: bytes,
        credentials: LocalCredential | Sequence[LocalCredential],
        authenticator: PeerAuthenticator,
        *,
        suites: Sequence[int],
        methods: Sequence[int],
        known_ead_labels: frozenset[int],
        debug: bool,
    ) -> Responder:
        items = cbor.as_list(cbor.loads(data), "handshake snapshot")
        if not items or type(items[0]) is not int or items[0] != RESPONDER_SNAPSHOT_VERSION:
            raise DecodeError(Reason.UNSUPPORTED, "not a version 1 handshake snapshot")
        if len(items) != 10:
            raise DecodeError(Reason.WRONG_TYPE, "handshake snapshot must have 10 elements")
        _, method, suite_id, c_i, c_r, th_3, prk_3e2m, y, id_cred_r, ead_1 = items
        method = cbor.as_uint(method, "method", max_value=255)
        c_i = cbor.as_bytes(c_i, "C_I", max_len=MAX_CONN_ID_LEN)
        c_r = cbor.as_bytes(c_r, "C_R", max_len=MAX_CONN_ID_LEN)
        if not c_r:
            raise DecodeError(Reason.WRONG_TYPE, "C_R must not be empty")
        if c_r == c_i:
            raise DecodeError(Reason.CONNECTION_ID_IN_USE, "C_R equals C_I")
        responder = cls(credentials, authenticator, c_r=c_r, suites=suites, methods=methods,
                        known_ead_labels=known_ead_labels, debug=debug)
        if method not in responder.methods:
            raise DecodeError(Reason.UNSUPPORTED_METHOD, f"method {method} not served here")
        suite = get_suite(cbor.as_int(suite_id, "suite"))
        if suite.ident not in responder.supported_suites(method):
            raise DecodeError(Reason.UNSUPPORTED_SUITE, f"suite {suite.ident} not served here")
        for what, value in (("TH_3", th_3), ("PRK_3e2m", prk_3e2m)):
            if len(cbor.as_bytes(value, what, max_len=suite.hash_length)) != suite.hash_length:
                raise DecodeError(Reason.WRONG_TYPE, f"{what} is not {suite.hash_length} bytes")
        y = cbor.as_bytes(y, "Y", max_len=suite.point_length)
        if initiator_signs(method) != (y == b""):
            raise DecodeError(Reason.MALFORMED, "Y is kept exactly when the initiator uses static DH")
        if y:
            suite.private_key_from_bytes(y)  # a valid scalar of the suite's curve
        id_cred = decode_id_cred(id_cred_r)
        want = AuthKind.SIGNATURE if responder_signs(method) else AuthKind.STATIC_DH
        credential = next((c for c in responder.credentials if c.kind is want and c.supports(suite)
                           and c.id_cred.encoded == id_cred.encoded), None)
        if credential is None:
            raise DecodeError(Reason.UNKNOWN_CREDENTIAL, "message_2 used a credential this responder lacks")
        ead_items = cbor.as_list(ead_1, "EAD_1")
        ead = decode_ead(ead_items, responder.known_ead_labels)
        if encode_ead(ead) != ead_items:
            raise DecodeError(Reason.MALFORMED, "EAD_1 items")
        responder._suite = suite
        responder._method = method
        responder._credential = credential
        responder._c_i = c_i
        responder._th = th_3
        responder._prk_3e2m = prk_3e2m
        responder._private = y
        responder._ead_received = {1: ead}
        responder.state = State.WAIT_M3
        return responder

    def process_error(self, data: bytes) -> None:
        """The initiator answered message_2 with an error: always fatal."""
        with self._step(Input.RECV_ERROR):
            err = decode_error_message(data)
            raise EdhocError(Reason.PEER_ERROR, f"peer sent ERR_CODE {err.err_code}")

    # --- message_4 -----------------------------------------------------------------------

    def create_message_4(self, ead_4: EadInput = ()) -> bytes:
        with self._step(Input.SEND_M4):
            key, iv, aad = self._aead_keys(self._prk_4e3m, _K_4, _IV_4, self._th)
            self._log("K_4", key)
            self._log("IV_4", iv)
            plaintext_4 = cbor.dumps_seq(*encode_ead(ead_4))
            message_4 = cbor.dumps(self.suite.encrypt(key, iv, plaintext_4, aad))
            self._log("message_4", message_4)
            return message_4
