"""sealmq: end-to-end sealed messaging between IoT devices and a backend over MQTT.

This package is the protocol core. It is sans-IO: it imports no socket, MQTT client,
asyncio, clock or random source. Time and randomness are always passed in by the caller
(the thin adapters in ``device/`` and ``backend/``), which is what lets the RFC 9529 and
RFC 8613 vectors be replayed byte for byte and the core be tested without a broker.
"""

__version__ = "0.1.0"
