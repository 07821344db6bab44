"""The I/O runtime shared by the device agent and the backend: the MQTT link (``mqtt``), the
endpoint driver (``driver``), the audit log (``audit``), the atomic file write (``files``) and the
command-line/environment options (``config``). The protocol core (``sealmq``) stays sans-IO;
everything that touches a socket, a clock, a random source or a file for both sides lives here,
thin. It imports only the core (tests/test_layers.py)."""
