"""EDHOC (RFC 9528): the authenticated key exchange that opens every sealmq session.

Import from here; the submodules are ``suites`` (cipher suites and their primitives),
``wire`` (message encodings), ``credentials`` (local credentials and peer authentication),
``ccs`` (CCS static-DH credentials for method 3)
and ``handshake`` (the Initiator/Responder state machines and :class:`EdhocResult`).
"""

from sealmq.edhoc.ccs import (
    Ccs,
    CcsAuthenticator,
    CcsCredential,
    CcsEntry,
    CcsIdentity,
    CcsRegistry,
    MixedAuthenticator,
    decode_ccs,
    encode_ccs,
)
from sealmq.edhoc.credentials import (
    AuthenticatedPeer,
    AuthKind,
    KnownChains,
    LocalCredential,
    PeerAuthenticator,
    StaticDhKey,
    TrustStoreLike,
    X509Authenticator,
    X509Credential,
)
from sealmq.edhoc.handshake import (
    EdhocResult,
    Initiator,
    Message1Info,
    Message2Info,
    Message3Info,
    Responder,
    State,
    connection_id,
)
from sealmq.edhoc.suites import DEFAULT_SUITES, SUITES, Suite, generate_ephemeral, get_suite
from sealmq.edhoc.wire import (
    EadItem,
    ErrorMessage,
    IdCred,
    decode_error_message,
    encode_error,
    encode_error_message,
    is_error_message,
)

__all__ = [
    "DEFAULT_SUITES",
    "SUITES",
    "AuthKind",
    "AuthenticatedPeer",
    "Ccs",
    "CcsAuthenticator",
    "CcsCredential",
    "CcsEntry",
    "CcsIdentity",
    "CcsRegistry",
    "EadItem",
    "EdhocResult",
    "ErrorMessage",
    "IdCred",
    "Initiator",
    "KnownChains",
    "LocalCredential",
    "Message1Info",
    "Message2Info",
    "Message3Info",
    "MixedAuthenticator",
    "PeerAuthenticator",
    "Responder",
    "State",
    "StaticDhKey",
    "Suite",
    "TrustStoreLike",
    "X509Authenticator",
    "X509Credential",
    "connection_id",
    "decode_ccs",
    "decode_error_message",
    "encode_ccs",
    "encode_error",
    "encode_error_message",
    "generate_ephemeral",
    "get_suite",
    "is_error_message",
]
