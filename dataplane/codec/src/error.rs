//! Codec errors. Every variant names the spec clause it enforces and maps to a reason code.
//!
//! Where the specification states a rule without a numbered conformance statement, the clause is the
//! section number alone (`[MQTT-2.2.2.2]`) so the tag still points at the text being enforced.

use crate::ReasonCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet is well-formed MQTT but exceeds the configured maximum packet size.
    #[error("[MQTT-3.2.2-15] packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: u32 },
    /// Any other violation; `clause` is the `[MQTT-x.y.z-n]` tag, `reason` the code to answer with.
    #[error("{clause} {message}")]
    Violation {
        clause: &'static str,
        message: String,
        reason: ReasonCode,
    },
}

impl DecodeError {
    /// The reason code a server sends (in CONNACK or DISCONNECT) before closing.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::Violation { reason, .. } => *reason,
        }
    }

    /// The `[MQTT-x.y.z-n]` clause this error enforces.
    pub fn clause(&self) -> &'static str {
        match self {
            DecodeError::PacketTooLarge { .. } => "[MQTT-3.2.2-15]",
            DecodeError::Violation { clause, .. } => clause,
        }
    }

    /// A violation answered with `reason`.
    pub fn violation(clause: &'static str, reason: ReasonCode, message: impl Into<String>) -> Self {
        DecodeError::Violation {
            clause,
            message: message.into(),
            reason,
        }
    }

    /// A Malformed Packet (0x81) violation.
    pub fn malformed(clause: &'static str, message: impl Into<String>) -> Self {
        Self::violation(clause, ReasonCode::MALFORMED_PACKET, message)
    }

    /// A Protocol Error (0x82) violation.
    pub fn protocol(clause: &'static str, message: impl Into<String>) -> Self {
        Self::violation(clause, ReasonCode::PROTOCOL_ERROR, message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("packet of {0} bytes exceeds the 268,435,455-byte remaining length limit")]
    TooLarge(usize),
    #[error("{0} cannot be sent with MQTT 3.1.1")]
    NotInV311(&'static str),
    #[error("string of {0} bytes exceeds 65,535")]
    StringTooLong(usize),
}
