"""The device side: the device agent (paho-mqtt adapter over the protocol core) and the simulator."""
