"""Who is on the other end of a session: the roles of the protocol and the peer identity the
endpoints and their adapters rely on.

The core defines these so that it needs no app package: ``pki.verify.VerifiedPeer`` (X.509) and
:class:`sealmq.edhoc.ccs.CcsIdentity` (a registered CCS) both satisfy :class:`PeerIdentity`
structurally. Broker account kinds (``broker.passwd.AccountRole``, which adds a monitor) are a
different concept and live with the broker.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class CredentialKind(StrEnum):
    """How a peer proved who it is: an X.509 certificate chain, or a registered CCS (method 3)."""

    X509 = "x509"
    CCS = "ccs"


class Role(StrEnum):
    """The two parties of the protocol: the EDHOC initiator (device) and responder (backend)."""

    DEVICE = "device"
    BACKEND = "backend"


@runtime_checkable
class PeerIdentity(Protocol):
    """What an authenticated peer is, whatever credential proved it (certificate or CCS)."""

    @property
    def role(self) -> Role: ...

    @property
    def name(self) -> str:
        """Device id or backend name: what the endpoints compare with the topic / configuration."""
        ...

    @property
    def public_key(self) -> Any:
        """The peer's authentication key (signature key, or static DH key for a CCS)."""
        ...

    @property
    def credential(self) -> str:
        """A short, non-secret description of the credential for audit logs (e.g. "ccs kid 0a1b")."""
        ...

    @property
    def kind(self) -> CredentialKind:
        """Which kind of credential authenticated the peer."""
        ...

    @property
    def credential_ref(self) -> bytes:
        """What names the credential where it is checked again: the leaf certificate (DER) for
        X.509, which a trust store re-validates; the kid for a CCS, which the registry holds."""
        ...
