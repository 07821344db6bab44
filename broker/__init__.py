"""The MQTT broker side: the embedded, hardened amqtt broker and the Eclipse Mosquitto configuration."""
