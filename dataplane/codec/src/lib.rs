//! MQTT codec
