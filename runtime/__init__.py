"""The I/O runtime shared by the device agent and the backend: the MQTT link, the audit log,
configuration files. The protocol core (``sealmq``) stays sans-IO; everything that touches a
socket, a clock, a random source or a file for both sides lives here, thin."""
