//! Parsing ARM request paths into their parts, with ARM's case-insensitive fixed segments.

use crate::error::ApiError;

/// Where a resource lives: a subscription and optionally a resource group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Subscription id as given.
    pub subscription: String,
    /// Resource group as given (None at subscription scope).
    pub resource_group: Option<String>,
}

/// A parsed ARM path below `/subscriptions/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArmPath {
    /// `…/providers/{ns}/{t1}/{n1}[/{t2}/{n2}…]`: one resource.
    Resource {
        /// Subscription / resource group.
        scope: Scope,
        /// Provider namespace as given.
        namespace: String,
        /// `(type, name)` pairs, outermost first.
        pairs: Vec<(String, String)>,
    },
    /// `…/providers/{ns}/{t1}[/{n1}/{t2}…]` ending in a type: a collection (list).
    Collection {
        /// Subscription / resource group.
        scope: Scope,
        /// Provider namespace.
        namespace: String,
        /// `(type, name)` pairs of the parent chain.
        parents: Vec<(String, String)>,
        /// The listed type segment.
        child_type: String,
    },
    /// `/subscriptions/{s}/providers/{ns}/operationStatuses/{id}` (`results == false`) or
    /// `…/operationResults/{id}` (the Location monitor).
    Operation {
        /// Subscription.
        subscription: String,
        /// Namespace.
        namespace: String,
        /// Operation id.
        id: String,
        /// Location monitor rather than status resource.
        results: bool,
    },
    /// `/providers/{ns}/operations`.
    ProviderOperations {
        /// Namespace.
        namespace: String,
    },
}

/// Decodes `%XX` escapes in one path segment (invalid escapes are kept literally).
pub fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a path segment for use in a URL (everything but unreserved characters).
pub fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "InvalidResourceType",
        format!("No route matches '{path}'."),
    )
}

impl ArmPath {
    /// Parses a raw (percent-encoded) URL path.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let segs: Vec<String> = raw
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(percent_decode)
            .collect();
        let eq = |i: usize, s: &str| segs.get(i).is_some_and(|x| x.eq_ignore_ascii_case(s));
        if segs.len() == 3 && eq(0, "providers") && eq(2, "operations") {
            return Ok(Self::ProviderOperations {
                namespace: segs[1].clone(),
            });
        }
        if !eq(0, "subscriptions") || segs.len() < 2 || segs[1].is_empty() {
            return Err(not_found(raw));
        }
        let subscription = segs[1].clone();
        let (resource_group, rest) = if eq(2, "resourceGroups") && segs.len() > 3 {
            (Some(segs[3].clone()), 4)
        } else {
            (None, 2)
        };
        if !eq(rest, "providers") || segs.len() < rest + 3 {
            return Err(not_found(raw));
        }
        let namespace = segs[rest + 1].clone();
        let tail = &segs[rest + 2..];
        if resource_group.is_none()
            && tail.len() == 2
            && (tail[0].eq_ignore_ascii_case("operationStatuses")
                || tail[0].eq_ignore_ascii_case("operationResults"))
        {
            return Ok(Self::Operation {
                subscription,
                namespace,
                id: tail[1].clone(),
                results: tail[0].eq_ignore_ascii_case("operationResults"),
            });
        }
        if tail.iter().any(|s| s.is_empty()) {
            return Err(not_found(raw));
        }
        let scope = Scope {
            subscription,
            resource_group,
        };
        let pairs: Vec<(String, String)> = tail
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect();
        if tail.len().is_multiple_of(2) {
            Ok(Self::Resource {
                scope,
                namespace,
                pairs,
            })
        } else {
            Ok(Self::Collection {
                scope,
                namespace,
                parents: pairs,
                child_type: tail[tail.len() - 1].clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_child_resource_case_insensitively() {
        let p = ArmPath::parse(
            "/SUBSCRIPTIONS/s1/resourcegroups/rg/Providers/Microsoft.EventGrid/namespaces/n1/topicSpaces/t%27x",
        )
        .unwrap();
        assert_eq!(
            p,
            ArmPath::Resource {
                scope: Scope {
                    subscription: "s1".into(),
                    resource_group: Some("rg".into())
                },
                namespace: "Microsoft.EventGrid".into(),
                pairs: vec![
                    ("namespaces".into(), "n1".into()),
                    ("topicSpaces".into(), "t'x".into())
                ],
            }
        );
    }

    #[test]
    fn parses_collections_and_operations() {
        assert!(matches!(
            ArmPath::parse("/subscriptions/s/providers/Microsoft.EventGrid/namespaces").unwrap(),
            ArmPath::Collection {
                scope: Scope {
                    resource_group: None,
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            ArmPath::parse("/subscriptions/s/providers/Ns/operationResults/abc").unwrap(),
            ArmPath::Operation { results: true, .. }
        ));
        assert!(ArmPath::parse("/nope").is_err());
        assert_eq!(percent_decode("a%2Fb%zz"), "a/b%zz");
        assert_eq!(percent_decode(&percent_encode("x y+z'")), "x y+z'");
    }
}
