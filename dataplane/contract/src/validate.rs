//! Structural rules a node checks before applying a snapshot. Each violation names the resource id
//! it comes from, so the control plane can mark exactly that resource `Failed` with the reason.
//!
//! These are the rules a node can check without I/O: names present and unique, ports not shared,
//! references that resolve, values this node understands, PEM that at least looks like PEM. Deeper
//! checks (a certificate that parses, a key that matches it) are the node's, when it builds its
//! listeners.

use std::collections::{HashMap, HashSet};

use crate::{
    AuthenticationMethod, BrokerFlavor, BrokerMethod, BrokerSnapshot, CertificateIssuer,
    ClientState, PermissionType, Protocol, QueueStrategy, SCHEMA_VERSION, ServerCertificate,
    ValidationScheme,
};

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource_id}: {message}")]
pub struct Violation {
    /// The ARM id of the resource the rule is about (the broker's id for snapshot-wide rules).
    pub resource_id: String,
    /// What is wrong, in a sentence a user can act on.
    pub message: String,
}

/// A snapshot that broke at least one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid snapshot of {broker_id}: {}", join(.violations))]
pub struct InvalidSnapshot {
    /// The broker the snapshot is for.
    pub broker_id: String,
    /// Every violation, in snapshot order.
    pub violations: Vec<Violation>,
}

/// Event Grid accepts two issuer certificates per namespace, for key rotation (Event Grid
/// documentation, "Authenticate with namespaces using JSON Web Tokens").
pub const MAX_ISSUER_CERTIFICATES: usize = 2;

fn join(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----";

fn looks_like_certificate(pem: &str) -> bool {
    pem.contains(CERT_PEM)
}

fn looks_like_private_key(pem: &str) -> bool {
    pem.contains("-----BEGIN") && pem.contains("PRIVATE KEY-----")
}

struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, resource_id: &str, message: impl Into<String>) {
        self.violations.push(Violation {
            resource_id: resource_id.to_owned(),
            message: message.into(),
        });
    }

    /// Checks names are present and unique (case-insensitively, as ARM names compare).
    fn names<'a>(&mut self, kind: &str, items: impl Iterator<Item = (&'a str, &'a str)>) {
        let mut seen: HashMap<String, &str> = HashMap::new();
        for (id, name) in items {
            if name.trim().is_empty() {
                self.fail(id, format!("{kind} has an empty name"));
                continue;
            }
            if let Some(first) = seen.insert(name.to_lowercase(), id) {
                self.fail(id, format!("{kind} name '{name}' is also used by {first}"));
            }
        }
    }
}

impl BrokerSnapshot {
    /// Checks the structural rules (see the module docs); `Err` lists every violation.
    pub fn validate(&self) -> Result<(), InvalidSnapshot> {
        let mut c = Checker {
            violations: Vec::new(),
        };
        let broker = self.broker_id.as_str();
        if broker.trim().is_empty() {
            c.fail(broker, "brokerId is empty");
        }
        if self.schema_version == 0 || self.schema_version > SCHEMA_VERSION {
            c.fail(
                broker,
                format!(
                    "schemaVersion {} is not supported (this node supports 1 to {SCHEMA_VERSION})",
                    self.schema_version
                ),
            );
        }
        if self.flavor == BrokerFlavor::Unknown {
            c.fail(broker, "unknown broker flavor");
        }
        self.check_listeners(&mut c);
        self.check_authentications(&mut c);
        self.check_authorizations(&mut c);
        self.check_namespaces(&mut c);
        self.check_connectors(&mut c);
        let limits = &self.limits;
        if limits.subscriber_queue_strategy == QueueStrategy::Unknown {
            c.fail(broker, "limits: unknown subscriberQueueStrategy");
        }
        if limits.max_packet_size_bytes == 0 {
            c.fail(broker, "limits: maxPacketSizeBytes must be at least 1");
        }
        if limits.subscriber_queue_length == 0 {
            c.fail(broker, "limits: subscriberQueueLength must be at least 1");
        }
        if c.violations.is_empty() {
            Ok(())
        } else {
            Err(InvalidSnapshot {
                broker_id: self.broker_id.clone(),
                violations: c.violations,
            })
        }
    }

    fn check_listeners(&self, c: &mut Checker) {
        c.names(
            "listener",
            self.listeners
                .iter()
                .map(|l| (l.id.as_str(), l.name.as_str())),
        );
        let authn: HashSet<String> = self
            .authentications
            .iter()
            .map(|a| a.name.to_lowercase())
            .collect();
        let authz: HashSet<String> = self
            .authorizations
            .iter()
            .map(|a| a.name.to_lowercase())
            .collect();
        let mut ports: HashMap<u16, &str> = HashMap::new();
        for l in &self.listeners {
            let id = l.id.as_str();
            if l.ports.is_empty() {
                c.fail(id, "listener has no ports");
            }
            for p in &l.ports {
                let at = format!("port {}", p.port);
                if p.port != 0
                    && let Some(first) = ports.insert(p.port, id)
                {
                    c.fail(id, format!("{at} is already used by {first}"));
                }
                if p.protocol == Protocol::Unknown {
                    c.fail(id, format!("{at}: unknown protocol"));
                }
                for r in &p.authentication_refs {
                    if !authn.contains(&r.to_lowercase()) {
                        c.fail(id, format!("{at}: authentication '{r}' does not exist"));
                    }
                }
                for r in &p.authorization_refs {
                    if !authz.contains(&r.to_lowercase()) {
                        c.fail(id, format!("{at}: authorization '{r}' does not exist"));
                    }
                }
                if let Some(ns) = &p.default_namespace
                    && self.namespace(ns).is_none()
                {
                    c.fail(id, format!("{at}: default namespace '{ns}' is not bound"));
                }
                let Some(tls) = &p.tls else { continue };
                if let Some(ca) = &tls.client_ca_pem
                    && !looks_like_certificate(ca)
                {
                    c.fail(id, format!("{at}: clientCaPem holds no PEM certificate"));
                }
                match &tls.certificate {
                    ServerCertificate::Automatic(a) => {
                        if a.issuer == CertificateIssuer::Unknown {
                            c.fail(id, format!("{at}: unknown certificate issuer"));
                        }
                    }
                    ServerCertificate::Manual(m) => {
                        match (&m.certificate_pem, &m.private_key_pem) {
                            (Some(cert), Some(key)) => {
                                if !looks_like_certificate(cert) {
                                    c.fail(
                                        id,
                                        format!("{at}: certificatePem holds no PEM certificate"),
                                    );
                                }
                                if !looks_like_private_key(key) {
                                    c.fail(
                                        id,
                                        format!("{at}: privateKeyPem holds no PEM private key"),
                                    );
                                }
                            }
                            (Some(_), None) | (None, Some(_)) => c.fail(
                                id,
                                format!(
                                    "{at}: certificatePem and privateKeyPem must be given together"
                                ),
                            ),
                            (None, None) => {
                                if m.secret_ref.is_none() && m.key_vault.is_none() {
                                    c.fail(id, format!("{at}: manual TLS names no certificate"));
                                }
                            }
                        }
                    }
                    ServerCertificate::Unknown => {
                        c.fail(id, format!("{at}: unknown TLS mode"));
                    }
                }
            }
        }
    }

    fn check_authentications(&self, c: &mut Checker) {
        c.names(
            "authentication",
            self.authentications
                .iter()
                .map(|a| (a.id.as_str(), a.name.as_str())),
        );
        for a in &self.authentications {
            let id = a.id.as_str();
            if a.methods.is_empty() {
                c.fail(id, "authentication has no methods");
            }
            for (i, m) in a.methods.iter().enumerate() {
                let at = format!("method {i}");
                match m {
                    AuthenticationMethod::UsernamePassword(s) => {
                        if s.credentials.is_empty()
                            && s.secret_ref.is_none()
                            && s.key_vault.is_none()
                        {
                            c.fail(id, format!("{at}: UsernamePassword names no credentials"));
                        }
                        let mut users = HashSet::new();
                        for cred in &s.credentials {
                            if cred.username.is_empty() {
                                c.fail(id, format!("{at}: a credential has an empty username"));
                            } else if !users.insert(cred.username.as_str()) {
                                c.fail(
                                    id,
                                    format!("{at}: username '{}' appears twice", cred.username),
                                );
                            }
                            // Never echo the value: it is a secret even when malformed.
                            if !cred.password_hash.starts_with("$argon2") {
                                c.fail(
                                    id,
                                    format!(
                                        "{at}: the password of '{}' is not an argon2 PHC hash",
                                        cred.username
                                    ),
                                );
                            }
                        }
                    }
                    AuthenticationMethod::X509(s) => {
                        if let Some(pem) = &s.trusted_ca_pem
                            && !looks_like_certificate(pem)
                        {
                            c.fail(id, format!("{at}: trustedCaPem holds no PEM certificate"));
                        }
                        for (name, attrs) in &s.authorization_attributes {
                            if attrs.subject.trim().is_empty() {
                                c.fail(
                                    id,
                                    format!(
                                        "{at}: authorizationAttributes '{name}' has no subject"
                                    ),
                                );
                            }
                        }
                    }
                    AuthenticationMethod::ServiceAccountToken(s) => {
                        if s.audiences.is_empty() {
                            c.fail(id, format!("{at}: ServiceAccountToken has no audiences"));
                        }
                    }
                    AuthenticationMethod::Custom(s) => {
                        if s.endpoint.trim().is_empty() {
                            c.fail(id, format!("{at}: Custom has no endpoint"));
                        }
                        if s.timeout_seconds == 0 {
                            c.fail(
                                id,
                                format!("{at}: Custom timeoutSeconds must be at least 1"),
                            );
                        }
                    }
                    AuthenticationMethod::Svid(_) => {}
                    AuthenticationMethod::Unknown => {
                        c.fail(id, format!("{at}: unknown authentication method"));
                    }
                }
            }
        }
    }

    fn check_authorizations(&self, c: &mut Checker) {
        c.names(
            "authorization",
            self.authorizations
                .iter()
                .map(|a| (a.id.as_str(), a.name.as_str())),
        );
        for a in &self.authorizations {
            for (i, rule) in a.rules.iter().enumerate() {
                for r in &rule.broker_resources {
                    match r.method {
                        BrokerMethod::Unknown => {
                            c.fail(&a.id, format!("rule {i}: unknown broker method"));
                        }
                        BrokerMethod::Publish | BrokerMethod::Subscribe if r.topics.is_empty() => {
                            c.fail(
                                &a.id,
                                format!("rule {i}: {:?} needs at least one topic", r.method),
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn check_namespaces(&self, c: &mut Checker) {
        c.names(
            "namespace",
            self.namespaces
                .iter()
                .map(|n| (n.id.as_str(), n.name.as_str())),
        );
        for ns in &self.namespaces {
            c.names(
                "client",
                ns.clients.iter().map(|x| (x.id.as_str(), x.name.as_str())),
            );
            c.names(
                "client authenticationName",
                ns.clients
                    .iter()
                    .map(|x| (x.id.as_str(), x.authentication_name.as_str())),
            );
            for client in &ns.clients {
                if client.state == ClientState::Unknown {
                    c.fail(&client.id, "unknown client state");
                }
                if let Some(auth) = &client.certificate_authentication {
                    match auth.validation_scheme {
                        Some(ValidationScheme::Unknown) => {
                            c.fail(&client.id, "unknown certificate validation scheme");
                        }
                        Some(ValidationScheme::ThumbprintMatch)
                            if auth.allowed_thumbprints.is_empty() =>
                        {
                            c.fail(&client.id, "ThumbprintMatch with no allowedThumbprints");
                        }
                        _ => {}
                    }
                }
            }
            c.names(
                "client group",
                ns.client_groups
                    .iter()
                    .map(|x| (x.id.as_str(), x.name.as_str())),
            );
            for g in &ns.client_groups {
                if g.query.trim().is_empty() {
                    c.fail(&g.id, "client group has no query");
                }
            }
            c.names(
                "topic space",
                ns.topic_spaces
                    .iter()
                    .map(|x| (x.id.as_str(), x.name.as_str())),
            );
            c.names(
                "permission binding",
                ns.permission_bindings
                    .iter()
                    .map(|x| (x.id.as_str(), x.name.as_str())),
            );
            let groups: HashSet<String> = ns
                .client_groups
                .iter()
                .map(|g| g.name.to_lowercase())
                .collect();
            let spaces: HashSet<String> = ns
                .topic_spaces
                .iter()
                .map(|t| t.name.to_lowercase())
                .collect();
            for b in &ns.permission_bindings {
                let group = b.client_group_name.to_lowercase();
                if group != "$all" && !groups.contains(&group) {
                    c.fail(
                        &b.id,
                        format!("client group '{}' does not exist", b.client_group_name),
                    );
                }
                if !spaces.contains(&b.topic_space_name.to_lowercase()) {
                    c.fail(
                        &b.id,
                        format!("topic space '{}' does not exist", b.topic_space_name),
                    );
                }
                if b.permission == PermissionType::Unknown {
                    c.fail(&b.id, "unknown permission");
                }
            }
            for ca in &ns.ca_certificates {
                if ca.encoded_certificate.trim().is_empty() {
                    c.fail(&ca.id, "CA certificate has no encodedCertificate");
                }
            }
            if let Some(jwt) = &ns.custom_jwt_authentication {
                if jwt.token_issuer.trim().is_empty() {
                    c.fail(&ns.id, "customJwtAuthentication has no tokenIssuer");
                }
                match jwt.issuer_certificates.len() {
                    0 => c.fail(&ns.id, "customJwtAuthentication has no issuer certificate"),
                    1 | 2 => {}
                    n => c.fail(
                        &ns.id,
                        format!(
                            "customJwtAuthentication has {n} issuer certificates; at most {MAX_ISSUER_CERTIFICATES}"
                        ),
                    ),
                }
                for cert in &jwt.issuer_certificates {
                    if cert.encoded_certificate.trim().is_empty() {
                        c.fail(&ns.id, "an issuer certificate has no encodedCertificate");
                    }
                }
            }
        }
    }

    fn check_connectors(&self, c: &mut Checker) {
        c.names(
            "bridge",
            self.bridges
                .iter()
                .map(|b| (b.id.as_str(), b.name.as_str())),
        );
        for b in &self.bridges {
            if b.remote_broker_connection.endpoint.trim().is_empty() {
                c.fail(&b.id, "bridge has no remote endpoint");
            }
            for map in &b.topic_maps {
                let mut names = HashSet::new();
                for r in &map.routes {
                    if !names.insert(r.name.as_str()) {
                        c.fail(&map.id, format!("route '{}' appears twice", r.name));
                    }
                    if r.qos > 2 {
                        c.fail(
                            &map.id,
                            format!("route '{}': qos {} is not 0-2", r.name, r.qos),
                        );
                    }
                    if !matches!(r.direction.as_str(), "remote-to-local" | "local-to-remote") {
                        c.fail(
                            &map.id,
                            format!("route '{}': unknown direction '{}'", r.name, r.direction),
                        );
                    }
                }
            }
        }
        c.names(
            "dataflow endpoint",
            self.dataflow_endpoints
                .iter()
                .map(|e| (e.id.as_str(), e.name.as_str())),
        );
        c.names(
            "dataflow profile",
            self.dataflow_profiles
                .iter()
                .map(|p| (p.id.as_str(), p.name.as_str())),
        );
        let profiles: HashSet<String> = self
            .dataflow_profiles
            .iter()
            .map(|p| p.name.to_lowercase())
            .collect();
        for d in &self.dataflows {
            if !profiles.contains(&d.profile_name.to_lowercase()) {
                c.fail(
                    &d.id,
                    format!("dataflow profile '{}' does not exist", d.profile_name),
                );
            }
        }
    }
}
