//! Compile errors: every error names the offending resource and, inside a topic template or
//! query, the character position.

/// A model that cannot be compiled into an engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A topic filter/template or `Connect` client-id pattern is malformed.
    #[error("{location}: {text:?} at position {position}: {message}")]
    Template {
        /// Where it sits, e.g. `authorization "a" rules[0].brokerResources[1].topics[2]`.
        location: String,
        text: String,
        /// 0-based character offset into `text`.
        position: usize,
        message: String,
    },
    /// An Event Grid client-group query does not parse.
    #[error("{location}: query {query:?} at position {position}: {message}")]
    Query {
        location: String,
        query: String,
        position: usize,
        message: String,
    },
    /// A reference, name or limit is wrong (unknown group, duplicate name, too many templates).
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
}
