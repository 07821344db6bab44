"""The backend service: handshake responder, sealed record processing, storage, audit log."""
