//! Table of malformed and illegal inputs: each must be refused with the clause it violates and the
//! reason code a server answers with. Test names follow the clause where it has a number.

use bytes::BytesMut;
use meridian_codec::{
    DecodeError, DecodeOptions, Protocol, ReasonCode, decode, peek_connect_protocol,
};

/// Before CONNECT: the decoder does not know the version yet.
const PRE: Option<Protocol> = None;
const V3: Option<Protocol> = Some(Protocol::V311);
const V5: Option<Protocol> = Some(Protocol::V5);

const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
const PROTOCOL: ReasonCode = ReasonCode::PROTOCOL_ERROR;

fn refuse(version: Option<Protocol>, wire: &[u8], clause: &str, reason: ReasonCode) {
    let opts = DecodeOptions {
        version,
        max_packet_size: 1 << 20,
        topic_alias_maximum: 10,
    };
    let mut buf = BytesMut::from(wire);
    match decode(&mut buf, &opts) {
        Err(e) => {
            assert_eq!(e.clause(), clause, "wrong clause for {wire:02x?}: {e}");
            assert_eq!(
                e.reason_code(),
                reason,
                "wrong reason code for {wire:02x?}: {e}"
            );
        }
        Ok(p) => panic!("{wire:02x?} was accepted as {p:?}"),
    }
}

macro_rules! table {
    ($($name:ident: $version:expr, $wire:expr => $clause:expr, $reason:expr;)*) => {
        $(
            #[test]
            fn $name() {
                refuse($version, $wire, $clause, $reason);
            }
        )*
    };
}

table! {
    // Fixed header.
    mqtt_2_1_2_packet_type_0_is_malformed: V5, b"\x00\x00" => "[MQTT-2.1.2]", MALFORMED;
    mqtt_2_1_2_auth_is_reserved_in_v311: V3, b"\xf0\x00" => "[MQTT-2.1.2]", MALFORMED;
    mqtt_3_1_0_1_first_packet_must_be_connect: PRE, b"\xc0\x00" => "[MQTT-3.1.0-1]", PROTOCOL;
    mqtt_3_1_0_1_publish_before_connect: PRE, b"\x30\x03\x00\x01t" => "[MQTT-3.1.0-1]", PROTOCOL;
    mqtt_2_1_3_1_pubrel_flags_must_be_0010: V5, b"\x60\x02\x00\x01" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_2_1_3_1_subscribe_flags_must_be_0010: V3, b"\x80\x06\x00\x01\x00\x01a\x00" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_2_1_3_1_unsubscribe_flags_must_be_0010: V3, b"\xa0\x05\x00\x01\x00\x01a" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_2_1_3_1_puback_flags_must_be_0000: V3, b"\x42\x02\x00\x01" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_2_1_3_1_pingreq_flags_must_be_0000: V5, b"\xc1\x00" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_2_1_3_1_connect_flags_must_be_0000: PRE, b"\x11\x00" => "[MQTT-2.1.3-1]", MALFORMED;
    mqtt_3_3_1_4_publish_qos3_is_malformed: V5, b"\x36\x03\x00\x01t" => "[MQTT-3.3.1-4]", MALFORMED;
    mqtt_3_3_1_2_dup_on_qos0_is_malformed: V3, b"\x38\x03\x00\x01t" => "[MQTT-3.3.1-2]", MALFORMED;
    mqtt_1_5_5_1_remaining_length_over_four_bytes: V5, b"\x30\xff\xff\xff\xff\x01" => "[MQTT-1.5.5-1]", MALFORMED;
    mqtt_1_5_5_1_remaining_length_not_minimal: V5, b"\xc0\x80\x00" => "[MQTT-1.5.5-1]", MALFORMED;

    // Lengths: truncated content and trailing bytes.
    mqtt_2_1_4_publish_qos1_without_packet_id: V3, b"\x32\x03\x00\x01t" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_string_longer_than_packet: V3, b"\x30\x03\x00\x05a" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_property_length_past_end: V5, b"\x40\x04\x00\x01\x00\x05" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_puback_v311_trailing_byte: V3, b"\x40\x03\x00\x01\x00" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_pingreq_with_body: V5, b"\xc0\x01\x00" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_disconnect_v311_with_body: V3, b"\xe0\x01\x00" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_unsuback_v311_with_payload: V3, b"\xb0\x03\x00\x01\x00" => "[MQTT-2.1.4]", MALFORMED;
    mqtt_2_1_4_connect_trailing_bytes: PRE, b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\x00" => "[MQTT-2.1.4]", MALFORMED;

    // CONNECT.
    mqtt_3_1_2_1_protocol_name_must_be_mqtt: PRE, b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00" => "[MQTT-3.1.2-1]", ReasonCode::UNSUPPORTED_PROTOCOL_VERSION;
    mqtt_3_1_2_2_unsupported_protocol_level: PRE, b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00" => "[MQTT-3.1.2-2]", ReasonCode::UNSUPPORTED_PROTOCOL_VERSION;
    mqtt_3_1_2_3_reserved_connect_flag_set: PRE, b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00" => "[MQTT-3.1.2-3]", MALFORMED;
    mqtt_3_1_2_11_will_qos_without_will_flag: PRE, b"\x10\x0c\x00\x04MQTT\x04\x08\x00\x3c\x00\x00" => "[MQTT-3.1.2-11]", MALFORMED;
    mqtt_3_1_2_12_will_qos_3_is_malformed: PRE, b"\x10\x0c\x00\x04MQTT\x04\x1c\x00\x3c\x00\x00" => "[MQTT-3.1.2-12]", MALFORMED;
    mqtt_3_1_2_13_will_retain_without_will_flag: PRE, b"\x10\x0c\x00\x04MQTT\x05\x20\x00\x3c\x00\x00" => "[MQTT-3.1.2-13]", MALFORMED;
    mqtt_3_1_2_22_v311_password_without_username: PRE, b"\x10\x0f\x00\x04MQTT\x04\x40\x00\x3c\x00\x00\x00\x01p" => "[MQTT-3.1.2-22]", MALFORMED;
    mqtt_3_3_2_2_will_topic_with_wildcard: PRE, b"\x10\x12\x00\x04MQTT\x04\x06\x00\x3c\x00\x00\x00\x01#\x00\x01x" => "[MQTT-3.3.2-2]", ReasonCode::TOPIC_NAME_INVALID;
    mqtt_1_5_4_1_client_id_invalid_utf8: PRE, b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01\xc3" => "[MQTT-1.5.4-1]", MALFORMED;
    connect_receive_maximum_0_is_protocol_error: PRE, b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00\x00\x00" => "[MQTT-3.1.2.11.3]", PROTOCOL;
    connect_maximum_packet_size_0_is_protocol_error: PRE, b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x05\x27\x00\x00\x00\x00\x00\x00" => "[MQTT-3.1.2.11.4]", PROTOCOL;
    connect_request_problem_information_2_is_protocol_error: PRE, b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x02\x17\x02\x00\x00" => "[MQTT-3.1.2.11.7]", PROTOCOL;
    connect_will_delay_outside_will_properties_is_malformed: PRE, b"\x10\x12\x00\x04MQTT\x05\x02\x00\x3c\x05\x18\x00\x00\x00\x01\x00\x00" => "[MQTT-2.2.2.2]", MALFORMED;
    connect_session_expiry_in_will_properties_is_malformed: PRE, b"\x10\x18\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x00\x05\x11\x00\x00\x00\x01\x00\x01w\x00\x00" => "[MQTT-2.2.2.2]", MALFORMED;

    // CONNACK.
    mqtt_3_2_2_1_connack_reserved_flags: V3, b"\x20\x02\x02\x00" => "[MQTT-3.2.2-1]", MALFORMED;
    connack_v311_reserved_return_code: V3, b"\x20\x02\x00\x06" => "[MQTT-3.2.2.3]", MALFORMED;
    connack_maximum_qos_2_is_protocol_error: V5, b"\x20\x05\x00\x00\x02\x24\x02" => "[MQTT-3.2.2.3.4]", PROTOCOL;
    connack_retain_available_2_is_protocol_error: V5, b"\x20\x05\x00\x00\x02\x25\x02" => "[MQTT-3.2.2.3.5]", PROTOCOL;

    // PUBLISH.
    mqtt_1_5_4_1_topic_invalid_utf8: V3, b"\x30\x03\x00\x01\xff" => "[MQTT-1.5.4-1]", MALFORMED;
    mqtt_1_5_4_1_topic_encoded_surrogate: V5, b"\x30\x06\x00\x03\xed\xa0\x80\x00" => "[MQTT-1.5.4-1]", MALFORMED;
    mqtt_1_5_4_2_topic_with_null_character: V3, b"\x30\x05\x00\x03a\x00b" => "[MQTT-1.5.4-2]", MALFORMED;
    mqtt_3_3_2_2_publish_topic_with_plus: V3, b"\x30\x05\x00\x03a/+" => "[MQTT-3.3.2-2]", ReasonCode::TOPIC_NAME_INVALID;
    mqtt_3_3_2_2_publish_topic_with_hash: V5, b"\x30\x06\x00\x03a/#\x00" => "[MQTT-3.3.2-2]", ReasonCode::TOPIC_NAME_INVALID;
    mqtt_2_2_1_3_publish_packet_id_0: V3, b"\x32\x05\x00\x01t\x00\x00" => "[MQTT-2.2.1-3]", PROTOCOL;
    // Payload Format Indicator 1 with bytes that are not UTF-8 (0xff): 0x99, for PUBLISH and for a will.
    mqtt_3_3_2_3_2_publish_utf8_indicator_with_invalid_payload: V5, b"\x30\x07\x00\x01t\x02\x01\x01\xff" => "[MQTT-3.3.2.3.2]", ReasonCode::PAYLOAD_FORMAT_INVALID;
    mqtt_3_1_3_2_3_will_utf8_indicator_with_invalid_payload: PRE, b"\x10\x16\x00\x04MQTT\x05\x06\x00\x3c\x00\x00\x00\x02\x01\x01\x00\x01w\x00\x01\xff" => "[MQTT-3.1.3.2.3]", ReasonCode::PAYLOAD_FORMAT_INVALID;
    mqtt_3_3_2_8_topic_alias_0: V5, b"\x30\x07\x00\x01t\x03\x23\x00\x00" => "[MQTT-3.3.2-8]", ReasonCode::TOPIC_ALIAS_INVALID;
    mqtt_3_3_2_9_topic_alias_above_maximum: V5, b"\x30\x07\x00\x01t\x03\x23\x00\x0b" => "[MQTT-3.3.2-9]", ReasonCode::TOPIC_ALIAS_INVALID;
    publish_v5_empty_topic_without_alias_is_protocol_error: V5, b"\x30\x03\x00\x00\x00" => "[MQTT-3.3.2.1]", PROTOCOL;
    mqtt_4_7_3_1_publish_v311_empty_topic: V3, b"\x30\x02\x00\x00" => "[MQTT-4.7.3-1]", ReasonCode::TOPIC_NAME_INVALID;
    publish_payload_format_indicator_2_is_protocol_error: V5, b"\x30\x06\x00\x01t\x02\x01\x02" => "[MQTT-3.3.2.3.2]", PROTOCOL;
    mqtt_3_3_2_14_response_topic_with_wildcard: V5, b"\x30\x08\x00\x01t\x04\x08\x00\x01#" => "[MQTT-3.3.2-14]", PROTOCOL;
    publish_session_expiry_not_allowed_is_malformed: V5, b"\x30\x09\x00\x01t\x05\x11\x00\x00\x00\x01" => "[MQTT-2.2.2.2]", MALFORMED;
    mqtt_2_2_2_2_duplicate_message_expiry: V5, b"\x30\x0e\x00\x01t\x0a\x02\x00\x00\x00\x01\x02\x00\x00\x00\x02" => "[MQTT-2.2.2-2]", PROTOCOL;
    publish_property_identifier_unknown_is_malformed: V5, b"\x30\x05\x00\x01t\x01\x7f" => "[MQTT-2.2.2.2]", MALFORMED;
    publish_property_value_not_minimal_varint: V5, b"\x30\x07\x00\x01t\x03\x0b\x81\x00" => "[MQTT-1.5.5-1]", MALFORMED;

    // PUBACK family.
    puback_topic_alias_not_allowed_is_malformed: V5, b"\x40\x07\x00\x01\x00\x03\x23\x00\x01" => "[MQTT-2.2.2.2]", MALFORMED;
    mqtt_2_2_1_3_puback_packet_id_0: V5, b"\x40\x02\x00\x00" => "[MQTT-2.2.1-3]", PROTOCOL;

    // SUBSCRIBE.
    mqtt_2_2_1_3_subscribe_packet_id_0: V3, b"\x82\x06\x00\x00\x00\x01a\x00" => "[MQTT-2.2.1-3]", PROTOCOL;
    mqtt_3_8_3_3_subscribe_v311_without_filters: V3, b"\x82\x02\x00\x01" => "[MQTT-3.8.3-3]", PROTOCOL;
    mqtt_3_8_3_3_subscribe_v5_without_filters: V5, b"\x82\x03\x00\x01\x00" => "[MQTT-3.8.3-3]", PROTOCOL;
    mqtt_3_8_3_5_subscription_options_reserved_bits_v5: V5, b"\x82\x07\x00\x01\x00\x00\x01a\x40" => "[MQTT-3.8.3-5]", MALFORMED;
    mqtt_3_8_3_5_subscription_options_reserved_bits_v311: V3, b"\x82\x06\x00\x01\x00\x01a\x04" => "[MQTT-3.8.3-5]", MALFORMED;
    mqtt_3_8_3_5_subscription_qos_3_v311: V3, b"\x82\x06\x00\x01\x00\x01a\x03" => "[MQTT-3.8.3-5]", MALFORMED;
    subscribe_v5_maximum_qos_3_is_protocol_error: V5, b"\x82\x07\x00\x01\x00\x00\x01a\x03" => "[MQTT-3.8.3.1]", PROTOCOL;
    subscribe_retain_handling_3_is_protocol_error: V5, b"\x82\x07\x00\x01\x00\x00\x01a\x30" => "[MQTT-3.8.3.1]", PROTOCOL;
    mqtt_4_7_1_1_hash_not_last_level: V5, b"\x82\x0b\x00\x01\x00\x00\x05a/#/b\x00" => "[MQTT-4.7.1-1]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_7_1_1_hash_inside_level: V3, b"\x82\x07\x00\x01\x00\x02a#\x00" => "[MQTT-4.7.1-1]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_7_1_2_plus_not_whole_level: V5, b"\x82\x08\x00\x01\x00\x00\x02a+\x00" => "[MQTT-4.7.1-2]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_7_3_1_empty_filter: V3, b"\x82\x05\x00\x01\x00\x00\x00" => "[MQTT-4.7.3-1]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_8_2_1_share_name_empty: V5, b"\x82\x0f\x00\x01\x00\x00\x09$share//a\x00" => "[MQTT-4.8.2-1]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_8_2_1_share_name_with_wildcard: V5, b"\x82\x10\x00\x01\x00\x00\x0a$share/+/a\x00" => "[MQTT-4.8.2-1]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_4_8_2_2_share_without_filter: V5, b"\x82\x0e\x00\x01\x00\x00\x08$share/g\x00" => "[MQTT-4.8.2-2]", ReasonCode::TOPIC_FILTER_INVALID;
    mqtt_3_8_3_4_no_local_on_shared_subscription: V5, b"\x82\x10\x00\x01\x00\x00\x0a$share/g/a\x04" => "[MQTT-3.8.3-4]", PROTOCOL;
    mqtt_2_2_2_2_subscription_identifier_twice_in_subscribe: V5, b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00" => "[MQTT-2.2.2-2]", PROTOCOL;
    subscription_identifier_0_is_protocol_error: V5, b"\x82\x09\x00\x01\x02\x0b\x00\x00\x01a\x00" => "[MQTT-3.8.2.1.2]", PROTOCOL;

    // SUBACK / UNSUBSCRIBE / UNSUBACK.
    mqtt_3_9_3_2_suback_v311_reserved_return_code: V3, b"\x90\x03\x00\x01\x03" => "[MQTT-3.9.3-2]", MALFORMED;
    suback_without_codes_is_malformed: V5, b"\x90\x03\x00\x01\x00" => "[MQTT-3.9.3]", MALFORMED;
    mqtt_3_10_3_2_unsubscribe_without_filters: V3, b"\xa2\x02\x00\x01" => "[MQTT-3.10.3-2]", PROTOCOL;
    mqtt_4_7_1_1_unsubscribe_invalid_filter: V3, b"\xa2\x06\x00\x01\x00\x02a#" => "[MQTT-4.7.1-1]", ReasonCode::TOPIC_FILTER_INVALID;
    unsuback_v5_without_codes_is_malformed: V5, b"\xb0\x03\x00\x01\x00" => "[MQTT-3.11.3]", MALFORMED;

    // DISCONNECT / AUTH.
    disconnect_topic_alias_not_allowed_is_malformed: V5, b"\xe0\x05\x00\x03\x23\x00\x01" => "[MQTT-2.2.2.2]", MALFORMED;
    auth_data_without_method_is_protocol_error: V5, b"\xf0\x06\x18\x04\x16\x00\x01\x01" => "[MQTT-3.1.2.11.10]", PROTOCOL;
}

#[test]
fn mqtt_3_2_2_15_packet_too_large_is_refused_from_the_fixed_header() {
    let opts = DecodeOptions {
        version: Some(Protocol::V5),
        max_packet_size: 10,
        topic_alias_maximum: 0,
    };
    // Only the fixed header has arrived: the size is already known to exceed the limit.
    let mut buf = BytesMut::from(&b"\x30\x10"[..]);
    let err = decode(&mut buf, &opts).unwrap_err();
    assert_eq!(err, DecodeError::PacketTooLarge { size: 18, max: 10 });
    assert_eq!(err.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    // Exactly at the limit is fine.
    let mut buf = BytesMut::from(&b"\x30\x08\x00\x01t\x00ayld"[..]);
    assert!(decode(&mut buf, &opts).unwrap().is_some());
}

#[test]
fn topic_alias_refused_when_none_was_announced() {
    let opts = DecodeOptions {
        version: Some(Protocol::V5),
        max_packet_size: 1 << 20,
        topic_alias_maximum: 0,
    };
    let mut buf = BytesMut::from(&b"\x30\x07\x00\x01t\x03\x23\x00\x01"[..]);
    let err = decode(&mut buf, &opts).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
}

#[test]
fn peek_connect_protocol_tells_which_connack_layout_to_answer_with() {
    assert_eq!(
        peek_connect_protocol(b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00"),
        Some(Protocol::V311)
    );
    assert_eq!(
        peek_connect_protocol(b"\x10\x0c\x00\x04MQTT\x05\x02"),
        Some(Protocol::V5)
    );
    assert_eq!(peek_connect_protocol(b"\x10\x0c\x00\x04MQ"), None);
    assert_eq!(peek_connect_protocol(b"\xc0\x00"), None);
}
