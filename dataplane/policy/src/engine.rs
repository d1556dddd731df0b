//! The compiled engine: decisions for CONNECT, PUBLISH and SUBSCRIBE, and explanations.
//!
//! **Domains.** A principal without a namespace is judged by the IoT Operations rules only; a
//! principal with an Event Grid namespace is judged by that namespace only (its registry,
//! groups, topic spaces and bindings). Nothing from one namespace can grant anything in another.
//!
//! **Index.** Every (rule, topic) or (binding, template) pair becomes a grant in a per-action
//! [`TopicIndex`], filed by the template's first level: a literal first level goes into a hash map
//! keyed by that literal; a first level that is exactly one variable goes into a bucket per
//! variable (looked up by resolving the variable for the principal and comparing it with the
//! request's first level); wildcard and mixed first levels go into short lists scanned every
//! time. A request therefore only looks at grants whose first level can match it, which keeps
//! 1,000 rules cheap as long as they do not all start with a wildcard. Owners (a rule's
//! principals, a binding's group) are checked per candidate: a hash lookup or a precomputed
//! group-membership flag, because Event Grid group membership depends only on registry data and
//! is evaluated once at compile time (clients admitted by a token are not in the registry: their
//! group queries are evaluated per candidate).

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::model::{
    AttributeValue, BrokerMethod, ClientState, EventGridClient, EventGridNamespace,
    IotAuthorization, Permission, PolicyModel,
};
use crate::query::{ClientGroupQuery, QuerySubject};
use crate::template::{ClientIdPattern, Dialect, First, Template, Var, Vars};
use crate::topic;

/// Topic spaces hold at most this many templates (Event Grid topic-space documentation).
pub const MAX_TOPIC_TEMPLATES: usize = 10;

/// The built-in Event Grid group that holds every client of the namespace.
pub const ALL_CLIENTS_GROUP: &str = "$all";

/// Who is asking. The broker fills it after authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Principal {
    /// The MQTT client identifier.
    pub client_id: String,
    /// The CONNECT user name, or the certificate CN for X.509 clients.
    #[serde(default)]
    pub username: Option<String>,
    /// The Event Grid authentication name established by authentication.
    #[serde(default)]
    pub authentication_name: Option<String>,
    /// Attributes from authentication (certificate `authorizationAttributes`, token claims, custom
    /// auth); used by IoT Operations rules. Event Grid uses the registry's attributes instead.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The Event Grid namespace the client reached (TLS SNI or listener default); `None` for the
    /// IoT Operations domain.
    #[serde(default)]
    pub namespace: Option<String>,
    /// An Event Grid client that authenticated with a token (the namespace's custom JWT
    /// authentication): its claims as client attributes. Such a client needs no registration: it
    /// is judged by these attributes (group queries, `${client.attributes.X}`), unless a
    /// registered client with the same authentication name is Disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_attributes: Option<TokenAttributes>,
}

/// The client attributes a token gave an Event Grid client, with their template values
/// precomputed so that deciding allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    from = "BTreeMap<String, AttributeValue>",
    into = "BTreeMap<String, AttributeValue>"
)]
pub struct TokenAttributes {
    attributes: BTreeMap<String, AttributeValue>,
    template_values: BTreeMap<String, String>,
}

impl From<BTreeMap<String, AttributeValue>> for TokenAttributes {
    fn from(attributes: BTreeMap<String, AttributeValue>) -> Self {
        let template_values = attributes
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_template_value()?)))
            .collect();
        TokenAttributes {
            attributes,
            template_values,
        }
    }
}

impl From<TokenAttributes> for BTreeMap<String, AttributeValue> {
    fn from(t: TokenAttributes) -> Self {
        t.attributes
    }
}

impl TokenAttributes {
    /// The attributes as the token gave them.
    pub fn attributes(&self) -> &BTreeMap<String, AttributeValue> {
        &self.attributes
    }
}

impl Principal {
    pub fn new(client_id: impl Into<String>) -> Principal {
        Principal {
            client_id: client_id.into(),
            ..Principal::default()
        }
    }

    pub fn with_username(mut self, username: impl Into<String>) -> Principal {
        self.username = Some(username.into());
        self
    }

    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Principal {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// An Event Grid principal: the namespace it reached and its authentication name.
    pub fn in_namespace(
        mut self,
        namespace: impl Into<String>,
        authentication_name: impl Into<String>,
    ) -> Principal {
        self.namespace = Some(namespace.into());
        self.authentication_name = Some(authentication_name.into());
        self
    }

    /// An Event Grid principal that a token authenticated, with the token's attributes.
    pub fn with_token_attributes(
        mut self,
        attributes: BTreeMap<String, AttributeValue>,
    ) -> Principal {
        self.token_attributes = Some(attributes.into());
        self
    }
}

/// What is being authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Connect,
    Publish,
    Subscribe,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Connect => "Connect",
            Action::Publish => "Publish",
            Action::Subscribe => "Subscribe",
        })
    }
}

/// The rule, binding or registry entry behind a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RuleRef {
    /// `rules[rule].brokerResources[resource]`, and `topics[entry]` / `clientIds[entry]`.
    #[serde(rename_all = "camelCase")]
    IotOperations {
        authorization: Arc<str>,
        rule: usize,
        resource: usize,
        entry: Option<usize>,
        pattern: Option<Arc<str>>,
    },
    /// A permission binding and the template of its topic space that matched.
    #[serde(rename_all = "camelCase")]
    EventGridBinding {
        namespace: Arc<str>,
        binding: Arc<str>,
        topic_space: Arc<str>,
        template: usize,
        pattern: Arc<str>,
    },
    /// The registered client (CONNECT in Event Grid is decided by the registry).
    #[serde(rename_all = "camelCase")]
    EventGridClient {
        namespace: Arc<str>,
        client: Arc<str>,
    },
    /// A client the namespace's custom JWT authentication admitted (not registered).
    #[serde(rename_all = "camelCase")]
    EventGridToken {
        namespace: Arc<str>,
        authentication_name: Arc<str>,
    },
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleRef::IotOperations {
                authorization,
                rule,
                resource,
                entry,
                pattern,
            } => {
                write!(
                    f,
                    "authorization {authorization:?} rules[{rule}].brokerResources[{resource}]"
                )?;
                if let (Some(entry), Some(pattern)) = (entry, pattern) {
                    write!(f, "[{entry}] {pattern:?}")?;
                }
                Ok(())
            }
            RuleRef::EventGridBinding {
                namespace,
                binding,
                topic_space,
                template,
                pattern,
            } => write!(
                f,
                "namespace {namespace:?} permission binding {binding:?} topic space {topic_space:?} topicTemplates[{template}] {pattern:?}"
            ),
            RuleRef::EventGridClient { namespace, client } => {
                write!(f, "namespace {namespace:?} client {client:?}")
            }
            RuleRef::EventGridToken {
                namespace,
                authentication_name,
            } => write!(
                f,
                "namespace {namespace:?} token client {authentication_name:?} (custom JWT authentication)"
            ),
        }
    }
}

/// An answer. Deny by default: `allowed` is true only when a rule or binding grants the action,
/// and then `by` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub by: Option<RuleRef>,
    /// Static text on the hot path, so deciding allocates nothing.
    pub reason: Cow<'static, str>,
}

impl Decision {
    fn deny(reason: &'static str) -> Decision {
        Decision {
            allowed: false,
            by: None,
            reason: Cow::Borrowed(reason),
        }
    }

    fn allow(by: RuleRef) -> Decision {
        Decision {
            allowed: true,
            by: Some(by),
            reason: Cow::Borrowed("granted"),
        }
    }
}

const NO_GRANT: &str = "no rule or binding grants this action";
const NO_AUTH_NAME: &str = "the principal has no authentication name";
const UNKNOWN_NAMESPACE: &str = "unknown Event Grid namespace";
const UNKNOWN_CLIENT: &str = "no client with this authentication name in the namespace";
const DISABLED_CLIENT: &str = "the client is disabled";

/// How one candidate fared in an explanation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// It grants the action.
    Granted,
    /// The rule's principals or the binding's group do not include the client.
    NotForThisPrincipal,
    /// A variable of the template is missing or unsafe for this client.
    Unusable,
    /// The template or client-id pattern does not match the request.
    NoMatch,
}

/// One rule/binding looked at by [`PolicyEngine::explain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consideration {
    pub rule: RuleRef,
    pub outcome: Outcome,
    pub detail: String,
}

/// The full reasoning behind a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub action: Action,
    pub topic: Option<String>,
    pub decision: Decision,
    pub considered: Vec<Consideration>,
}

// ---------------------------------------------------------------------------------------------
// Grants and the topic index

#[derive(Debug)]
struct Grant {
    /// Rule index (IoT Operations) or binding index (Event Grid).
    owner: u32,
    template: Template,
    by: RuleRef,
}

#[derive(Debug, Default)]
struct TopicIndex {
    grants: Vec<Grant>,
    by_literal: HashMap<Box<str>, Vec<u32>>,
    by_var: Vec<(Var, Vec<u32>)>,
    wildcard: Vec<u32>,
    pattern: Vec<u32>,
}

impl TopicIndex {
    fn add(&mut self, grant: Grant) {
        let id = self.grants.len() as u32;
        match grant.template.first() {
            First::Literal(s) => self.by_literal.entry(s.into()).or_default().push(id),
            First::Var(v) => match self.by_var.iter_mut().find(|(var, _)| var == v) {
                Some((_, ids)) => ids.push(id),
                None => self.by_var.push((v.clone(), vec![id])),
            },
            First::Wildcard => self.wildcard.push(id),
            First::Pattern => self.pattern.push(id),
        }
        self.grants.push(grant);
    }

    /// The lowest-numbered grant that `accept` takes among those whose first level can match a
    /// request starting with `first` (a topic level, or `+`/`#` for a wildcard filter level).
    fn find(
        &self,
        first: &str,
        vars: &impl Vars,
        accept: impl Fn(&Grant) -> bool,
    ) -> Option<&Grant> {
        let mut best: Option<u32> = None;
        let mut scan = |ids: &[u32]| {
            for &id in ids {
                if best.is_some_and(|b| b <= id) {
                    return;
                }
                if accept(&self.grants[id as usize]) {
                    best = Some(id);
                    return;
                }
            }
        };
        // A literal, variable or mixed first level never covers a wildcard request level.
        if first != "+" && first != "#" {
            if let Some(ids) = self.by_literal.get(first) {
                scan(ids);
            }
            for (var, ids) in &self.by_var {
                if vars.get(var) == Some(first) {
                    scan(ids);
                }
            }
            scan(&self.pattern);
        }
        scan(&self.wildcard);
        best.map(|id| &self.grants[id as usize])
    }
}

// ---------------------------------------------------------------------------------------------
// IoT Operations

/// One attribute map of a rule's principals: every pair must match.
type AttributeSet = Box<[(Box<str>, Box<str>)]>;

#[derive(Debug)]
struct IotRule {
    client_ids: HashSet<Box<str>>,
    usernames: HashSet<Box<str>>,
    attributes: Vec<AttributeSet>,
}

impl IotRule {
    fn applies_to(&self, p: &Principal) -> bool {
        self.client_ids.contains(p.client_id.as_str())
            || p.username
                .as_deref()
                .is_some_and(|u| self.usernames.contains(u))
            || self.attributes.iter().any(|set| {
                set.iter()
                    .all(|(k, v)| p.attributes.get(&**k).is_some_and(|have| **have == **v))
            })
    }

    fn why_not(&self, p: &Principal) -> String {
        format!(
            "principals do not include client id {:?}, username {:?} or its attributes",
            p.client_id, p.username
        )
    }
}

#[derive(Debug)]
struct ConnectGrant {
    rule: u32,
    resource: usize,
    authorization: Arc<str>,
    rule_in_authorization: usize,
    client_ids: Vec<ClientIdPattern>,
}

struct PrincipalVars<'a>(&'a Principal);

impl Vars for PrincipalVars<'_> {
    fn get(&self, var: &Var) -> Option<&str> {
        match var {
            Var::ClientId => Some(&self.0.client_id),
            Var::Username => self.0.username.as_deref(),
            Var::PrincipalAttribute(name) => self.0.attributes.get(&**name).map(String::as_str),
            Var::AuthenticationName | Var::ClientAttribute(_) => None,
        }
    }
}

#[derive(Debug, Default)]
struct IotDomain {
    rules: Vec<IotRule>,
    connect: Vec<ConnectGrant>,
    publish: TopicIndex,
    subscribe: TopicIndex,
}

fn compile_iot(auths: &[IotAuthorization]) -> Result<IotDomain, PolicyError> {
    let mut domain = IotDomain::default();
    for auth in auths {
        let name: Arc<str> = auth.name.as_str().into();
        for (ri, rule) in auth.rules.iter().enumerate() {
            let rule_id = domain.rules.len() as u32;
            let p = &rule.principals;
            domain.rules.push(IotRule {
                client_ids: p.client_ids.iter().map(|s| s.as_str().into()).collect(),
                usernames: p.usernames.iter().map(|s| s.as_str().into()).collect(),
                attributes: p
                    .attributes
                    .iter()
                    .filter(|m| !m.is_empty())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                            .collect()
                    })
                    .collect(),
            });
            for (si, res) in rule.broker_resources.iter().enumerate() {
                let location = |what: &str, i: usize| {
                    format!(
                        "authorization {:?} rules[{ri}].brokerResources[{si}].{what}[{i}]",
                        auth.name
                    )
                };
                match res.method {
                    BrokerMethod::Connect => {
                        let mut client_ids = Vec::new();
                        for (ci, text) in res.client_ids.iter().enumerate() {
                            let pattern = ClientIdPattern::parse(text).map_err(|e| {
                                PolicyError::Template {
                                    location: location("clientIds", ci),
                                    text: text.clone(),
                                    position: e.position,
                                    message: e.message,
                                }
                            })?;
                            client_ids.push(pattern);
                        }
                        domain.connect.push(ConnectGrant {
                            rule: rule_id,
                            resource: si,
                            authorization: name.clone(),
                            rule_in_authorization: ri,
                            client_ids,
                        });
                    }
                    BrokerMethod::Publish | BrokerMethod::Subscribe => {
                        for (ti, text) in res.topics.iter().enumerate() {
                            let template =
                                Template::parse(text, Dialect::IotOperations).map_err(|e| {
                                    PolicyError::Template {
                                        location: location("topics", ti),
                                        text: text.clone(),
                                        position: e.position,
                                        message: e.message,
                                    }
                                })?;
                            let grant = Grant {
                                owner: rule_id,
                                by: RuleRef::IotOperations {
                                    authorization: name.clone(),
                                    rule: ri,
                                    resource: si,
                                    entry: Some(ti),
                                    pattern: Some(template.text.clone()),
                                },
                                template,
                            };
                            if res.method == BrokerMethod::Publish {
                                domain.publish.add(grant);
                            } else {
                                domain.subscribe.add(grant);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(domain)
}

// ---------------------------------------------------------------------------------------------
// Event Grid

#[derive(Debug)]
struct Client {
    model: EventGridClient,
    name: Arc<str>,
    authentication_name: Box<str>,
    /// `${client.attributes.NAME}` values, precomputed (integers and booleans as text).
    template_values: BTreeMap<String, String>,
    /// Membership per group index.
    in_group: Box<[bool]>,
}

/// Who an Event Grid decision is about.
enum Subject<'a> {
    /// A registered client (certificate authentication).
    Registered(&'a Client),
    /// A client admitted by the namespace's custom JWT authentication: its token's `sub` and
    /// claims, group membership evaluated per decision.
    Token {
        authentication_name: &'a str,
        attributes: &'a TokenAttributes,
    },
}

impl Subject<'_> {
    fn in_group(&self, ns: &Namespace, group: usize) -> bool {
        match self {
            Subject::Registered(c) => c.in_group[group],
            Subject::Token {
                authentication_name,
                attributes,
            } => ns.queries[group].as_ref().is_none_or(|q| {
                q.matches(&QuerySubject {
                    authentication_name,
                    attributes: &attributes.attributes,
                })
            }),
        }
    }

    fn vars(&self) -> SubjectVars<'_> {
        match self {
            // Topic matching uses the registered spelling, as Event Grid does.
            Subject::Registered(c) => SubjectVars {
                authentication_name: &c.authentication_name,
                template_values: &c.template_values,
            },
            Subject::Token {
                authentication_name,
                attributes,
            } => SubjectVars {
                authentication_name,
                template_values: &attributes.template_values,
            },
        }
    }

    /// How explanations name the subject.
    fn describe(&self) -> String {
        match self {
            Subject::Registered(c) => format!("client {:?}", c.name),
            Subject::Token {
                authentication_name,
                ..
            } => format!("token client {authentication_name:?}"),
        }
    }

    fn connect_ref(&self, ns: &Namespace) -> RuleRef {
        match self {
            Subject::Registered(c) => RuleRef::EventGridClient {
                namespace: ns.name.clone(),
                client: c.name.clone(),
            },
            Subject::Token {
                authentication_name,
                ..
            } => RuleRef::EventGridToken {
                namespace: ns.name.clone(),
                authentication_name: Arc::from(*authentication_name),
            },
        }
    }
}

struct SubjectVars<'a> {
    authentication_name: &'a str,
    template_values: &'a BTreeMap<String, String>,
}

impl Vars for SubjectVars<'_> {
    fn get(&self, var: &Var) -> Option<&str> {
        match var {
            Var::AuthenticationName => Some(self.authentication_name),
            Var::ClientAttribute(name) => self.template_values.get(&**name).map(String::as_str),
            Var::ClientId | Var::Username | Var::PrincipalAttribute(_) => None,
        }
    }
}

#[derive(Debug)]
struct Binding {
    group: u32,
}

#[derive(Debug)]
struct Namespace {
    name: Arc<str>,
    clients: Vec<Client>,
    /// Caseless hash of the authentication name → client indices.
    by_auth_name: HashMap<u64, Vec<u32>>,
    group_names: Vec<Arc<str>>,
    /// Each group's query (`None` for `$all`), for clients that tokens admit.
    queries: Vec<Option<ClientGroupQuery>>,
    bindings: Vec<Binding>,
    publish: TopicIndex,
    subscribe: TopicIndex,
}

fn caseless_hash(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    for b in s.bytes() {
        h.write_u8(b.to_ascii_lowercase());
    }
    h.finish()
}

impl Namespace {
    fn client(&self, authentication_name: &str) -> Option<&Client> {
        self.by_auth_name
            .get(&caseless_hash(authentication_name))?
            .iter()
            .map(|&i| &self.clients[i as usize])
            .find(|c| {
                c.authentication_name
                    .eq_ignore_ascii_case(authentication_name)
            })
    }
}

fn compile_namespace(ns: &EventGridNamespace) -> Result<Namespace, PolicyError> {
    let ns_name: Arc<str> = ns.name.as_str().into();
    let at = |what: String| format!("namespace {:?} {what}", ns.name);

    // Groups: `$all` first, then the declared ones.
    let mut group_names: Vec<Arc<str>> = vec![ALL_CLIENTS_GROUP.into()];
    let mut queries: Vec<Option<ClientGroupQuery>> = vec![None];
    for group in &ns.client_groups {
        let location = at(format!("client group {:?}", group.name));
        if group_names.iter().any(|g| **g == *group.name) {
            return Err(PolicyError::Invalid {
                location,
                message: "duplicate client group name (or a redefinition of $all)".into(),
            });
        }
        let query = ClientGroupQuery::parse(&group.query).map_err(|e| PolicyError::Query {
            location: location.clone(),
            query: group.query.clone(),
            position: e.position,
            message: e.message,
        })?;
        group_names.push(group.name.as_str().into());
        queries.push(Some(query));
    }

    // Clients, with group membership decided once.
    let mut clients = Vec::new();
    let mut by_auth_name: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut names = HashSet::new();
    for c in &ns.clients {
        let location = at(format!("client {:?}", c.name));
        if !names.insert(c.name.as_str()) {
            return Err(PolicyError::Invalid {
                location,
                message: "duplicate client name".into(),
            });
        }
        let auth = c.effective_authentication_name();
        if auth.is_empty() {
            return Err(PolicyError::Invalid {
                location,
                message: "empty authentication name".into(),
            });
        }
        let hash = caseless_hash(auth);
        let slot = by_auth_name.entry(hash).or_default();
        if slot.iter().any(|&i| {
            let other: &Client = &clients[i as usize];
            other.authentication_name.eq_ignore_ascii_case(auth)
        }) {
            return Err(PolicyError::Invalid {
                location,
                message: format!(
                    "authentication name {auth:?} is already used in this namespace (names are compared ignoring case)"
                ),
            });
        }
        slot.push(clients.len() as u32);
        let subject = QuerySubject {
            authentication_name: auth,
            attributes: &c.attributes,
        };
        let in_group = queries
            .iter()
            .map(|q| q.as_ref().is_none_or(|q| q.matches(&subject)))
            .collect();
        clients.push(Client {
            model: c.clone(),
            name: c.name.as_str().into(),
            authentication_name: auth.into(),
            template_values: c
                .attributes
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_template_value()?)))
                .collect(),
            in_group,
        });
    }

    // Topic spaces.
    let mut spaces: HashMap<&str, (Arc<str>, Vec<Template>)> = HashMap::new();
    for space in &ns.topic_spaces {
        let location = at(format!("topic space {:?}", space.name));
        if spaces.contains_key(space.name.as_str()) {
            return Err(PolicyError::Invalid {
                location,
                message: "duplicate topic space name".into(),
            });
        }
        if space.topic_templates.len() > MAX_TOPIC_TEMPLATES {
            return Err(PolicyError::Invalid {
                location,
                message: format!(
                    "{} topic templates; a topic space holds at most {MAX_TOPIC_TEMPLATES}",
                    space.topic_templates.len()
                ),
            });
        }
        let mut templates = Vec::new();
        for (i, text) in space.topic_templates.iter().enumerate() {
            let t =
                Template::parse(text, Dialect::EventGrid).map_err(|e| PolicyError::Template {
                    location: format!("{location} topicTemplates[{i}]"),
                    text: text.clone(),
                    position: e.position,
                    message: e.message,
                })?;
            templates.push(t);
        }
        spaces.insert(&space.name, (space.name.as_str().into(), templates));
    }

    // Bindings.
    let mut bindings = Vec::new();
    let mut publish = TopicIndex::default();
    let mut subscribe = TopicIndex::default();
    let mut binding_names = HashSet::new();
    for b in &ns.permission_bindings {
        let location = at(format!("permission binding {:?}", b.name));
        if !binding_names.insert(b.name.as_str()) {
            return Err(PolicyError::Invalid {
                location,
                message: "duplicate permission binding name".into(),
            });
        }
        let Some(group) = group_names.iter().position(|g| **g == *b.client_group_name) else {
            return Err(PolicyError::Invalid {
                location,
                message: format!("unknown client group {:?}", b.client_group_name),
            });
        };
        let Some((space_name, templates)) = spaces.get(b.topic_space_name.as_str()) else {
            return Err(PolicyError::Invalid {
                location,
                message: format!("unknown topic space {:?}", b.topic_space_name),
            });
        };
        let binding_id = bindings.len() as u32;
        bindings.push(Binding {
            group: group as u32,
        });
        let binding_name: Arc<str> = b.name.as_str().into();
        for (i, t) in templates.iter().enumerate() {
            let grant = Grant {
                owner: binding_id,
                by: RuleRef::EventGridBinding {
                    namespace: ns_name.clone(),
                    binding: binding_name.clone(),
                    topic_space: space_name.clone(),
                    template: i,
                    pattern: t.text.clone(),
                },
                template: t.clone(),
            };
            match b.permission {
                Permission::Publisher => publish.add(grant),
                Permission::Subscriber => subscribe.add(grant),
            }
        }
    }

    Ok(Namespace {
        name: ns_name,
        clients,
        by_auth_name,
        group_names,
        queries,
        bindings,
        publish,
        subscribe,
    })
}

// ---------------------------------------------------------------------------------------------
// The engine

/// A compiled, immutable authorization policy. Swap the whole engine (e.g. behind an `Arc`) to
/// apply a new model.
#[derive(Debug, Default)]
pub struct PolicyEngine {
    iot: IotDomain,
    namespaces: HashMap<Box<str>, Namespace>,
}

/// The request, validated and unwrapped.
enum Request<'a> {
    Publish(&'a str),
    Subscribe(&'a str),
}

impl<'a> Request<'a> {
    fn first(&self) -> &'a str {
        let (Request::Publish(t) | Request::Subscribe(t)) = self;
        t.split('/').next().unwrap_or("")
    }

    fn matched_by(&self, template: &Template, vars: &impl Vars) -> bool {
        match self {
            Request::Publish(t) => template.matches_topic(t, vars),
            Request::Subscribe(f) => template.covers_filter(f, vars),
        }
    }
}

fn parse_request(action: Action, topic: &str) -> Result<Request<'_>, &'static str> {
    match action {
        Action::Publish => topic::validate_topic_name(topic).map(|()| Request::Publish(topic)),
        Action::Subscribe => {
            let (_, inner) = topic::split_shared(topic)?;
            topic::validate_filter(inner)?;
            Ok(Request::Subscribe(inner))
        }
        Action::Connect => unreachable!("connect has no topic"),
    }
}

impl PolicyEngine {
    /// Compiles a model. Errors name the offending rule, template or query (with position).
    pub fn compile(model: &PolicyModel) -> Result<PolicyEngine, PolicyError> {
        let iot = compile_iot(&model.iot_operations)?;
        let mut namespaces = HashMap::new();
        for ns in &model.event_grid {
            if namespaces.contains_key(ns.name.as_str()) {
                return Err(PolicyError::Invalid {
                    location: format!("namespace {:?}", ns.name),
                    message: "duplicate namespace name".into(),
                });
            }
            namespaces.insert(ns.name.as_str().into(), compile_namespace(ns)?);
        }
        Ok(PolicyEngine { iot, namespaces })
    }

    /// The registered Event Grid client a principal would be judged as (authentication looks up
    /// its validation scheme here). Authentication names compare ignoring ASCII case.
    pub fn event_grid_client(
        &self,
        namespace: &str,
        authentication_name: &str,
    ) -> Option<&EventGridClient> {
        self.namespaces
            .get(namespace)?
            .client(authentication_name)
            .map(|c| &c.model)
    }

    /// Resolves an Event Grid principal to its namespace and subject: its enabled registered
    /// client, or, for a token client, its token's attributes (refused when a registered client
    /// of that authentication name is Disabled).
    fn event_grid_subject<'a>(
        &'a self,
        p: &'a Principal,
    ) -> Result<(&'a Namespace, Subject<'a>), &'static str> {
        let ns_name = p
            .namespace
            .as_deref()
            .expect("called for namespaced principals");
        let ns = self.namespaces.get(ns_name).ok_or(UNKNOWN_NAMESPACE)?;
        let auth = p.authentication_name.as_deref().ok_or(NO_AUTH_NAME)?;
        let registered = ns.client(auth);
        if registered.is_some_and(|c| c.model.state == ClientState::Disabled) {
            return Err(DISABLED_CLIENT);
        }
        if let Some(attributes) = &p.token_attributes {
            return Ok((
                ns,
                Subject::Token {
                    authentication_name: auth,
                    attributes,
                },
            ));
        }
        Ok((ns, Subject::Registered(registered.ok_or(UNKNOWN_CLIENT)?)))
    }

    /// May this principal connect?
    pub fn connect(&self, p: &Principal) -> Decision {
        if p.namespace.is_some() {
            return match self.event_grid_subject(p) {
                Ok((ns, subject)) => Decision::allow(subject.connect_ref(ns)),
                Err(reason) => Decision::deny(reason),
            };
        }
        let vars = PrincipalVars(p);
        for grant in &self.iot.connect {
            if !self.iot.rules[grant.rule as usize].applies_to(p) {
                continue;
            }
            if grant.client_ids.is_empty() {
                return Decision::allow(connect_ref(grant, None));
            }
            for (i, pattern) in grant.client_ids.iter().enumerate() {
                if pattern.usable(&vars).is_ok() && pattern.matches(&p.client_id, &vars) {
                    return Decision::allow(connect_ref(grant, Some(i)));
                }
            }
        }
        Decision::deny(NO_GRANT)
    }

    /// May this principal publish to `topic` (a topic name)? Also use it for will messages at
    /// CONNECT and for retained messages at delivery.
    pub fn publish(&self, p: &Principal, topic: &str) -> Decision {
        self.decide(p, Action::Publish, topic)
    }

    /// May this principal subscribe to `filter`? `$share/{group}/{filter}` is judged on
    /// `{filter}`. Allowed only when every topic the filter can match is allowed.
    pub fn subscribe(&self, p: &Principal, filter: &str) -> Decision {
        self.decide(p, Action::Subscribe, filter)
    }

    fn decide(&self, p: &Principal, action: Action, topic: &str) -> Decision {
        let request = match parse_request(action, topic) {
            Ok(r) => r,
            Err(reason) => return Decision::deny(reason),
        };
        let first = request.first();
        let found = if p.namespace.is_some() {
            let (ns, subject) = match self.event_grid_subject(p) {
                Ok(found) => found,
                Err(reason) => return Decision::deny(reason),
            };
            let index = match action {
                Action::Publish => &ns.publish,
                _ => &ns.subscribe,
            };
            let vars = subject.vars();
            index.find(first, &vars, |g| {
                subject.in_group(ns, ns.bindings[g.owner as usize].group as usize)
                    && g.template.usable(&vars).is_ok()
                    && request.matched_by(&g.template, &vars)
            })
        } else {
            let index = match action {
                Action::Publish => &self.iot.publish,
                _ => &self.iot.subscribe,
            };
            let vars = PrincipalVars(p);
            index.find(first, &vars, |g| {
                self.iot.rules[g.owner as usize].applies_to(p)
                    && (!g.template.has_vars() || g.template.usable(&vars).is_ok())
                    && request.matched_by(&g.template, &vars)
            })
        };
        match found {
            Some(grant) => Decision::allow(grant.by.clone()),
            None => Decision::deny(NO_GRANT),
        }
    }

    /// Lists every rule or binding of the principal's domain that could bear on the request and
    /// why each did or did not grant it. `topic` is ignored for `Connect`. The decision is the
    /// same as [`connect`](Self::connect) / [`publish`](Self::publish) /
    /// [`subscribe`](Self::subscribe) would give.
    pub fn explain(&self, p: &Principal, action: Action, topic: &str) -> Explanation {
        let decision = match action {
            Action::Connect => self.connect(p),
            Action::Publish => self.publish(p, topic),
            Action::Subscribe => self.subscribe(p, topic),
        };
        let mut considered = Vec::new();
        let request = match action {
            Action::Connect => None,
            _ => match parse_request(action, topic) {
                Ok(r) => Some(r),
                Err(_) => {
                    return Explanation {
                        action,
                        topic: Some(topic.to_string()),
                        decision,
                        considered,
                    };
                }
            },
        };
        if p.namespace.is_some() {
            self.explain_event_grid(p, action, request.as_ref(), &mut considered);
        } else {
            self.explain_iot(p, action, request.as_ref(), &mut considered);
        }
        Explanation {
            action,
            topic: (action != Action::Connect).then(|| topic.to_string()),
            decision,
            considered,
        }
    }

    fn explain_iot(
        &self,
        p: &Principal,
        action: Action,
        request: Option<&Request<'_>>,
        out: &mut Vec<Consideration>,
    ) {
        let vars = PrincipalVars(p);
        let Some(request) = request else {
            for grant in &self.iot.connect {
                let rule = &self.iot.rules[grant.rule as usize];
                if !rule.applies_to(p) {
                    out.push(Consideration {
                        rule: connect_ref(grant, None),
                        outcome: Outcome::NotForThisPrincipal,
                        detail: rule.why_not(p),
                    });
                    continue;
                }
                if grant.client_ids.is_empty() {
                    out.push(Consideration {
                        rule: connect_ref(grant, None),
                        outcome: Outcome::Granted,
                        detail: "Connect with any client id".into(),
                    });
                    continue;
                }
                for (i, pattern) in grant.client_ids.iter().enumerate() {
                    let (outcome, detail) = match pattern.usable(&vars) {
                        Err(why) => (Outcome::Unusable, why.to_string()),
                        Ok(()) if pattern.matches(&p.client_id, &vars) => (
                            Outcome::Granted,
                            format!("client id {:?} matches", p.client_id),
                        ),
                        Ok(()) => (
                            Outcome::NoMatch,
                            format!("client id {:?} does not match", p.client_id),
                        ),
                    };
                    out.push(Consideration {
                        rule: connect_ref(grant, Some(i)),
                        outcome,
                        detail,
                    });
                }
            }
            return;
        };
        let index = match action {
            Action::Publish => &self.iot.publish,
            _ => &self.iot.subscribe,
        };
        for g in &index.grants {
            let rule = &self.iot.rules[g.owner as usize];
            let (outcome, detail) = if !rule.applies_to(p) {
                (Outcome::NotForThisPrincipal, rule.why_not(p))
            } else {
                judge(&g.template, request, &vars)
            };
            out.push(Consideration {
                rule: g.by.clone(),
                outcome,
                detail,
            });
        }
    }

    fn explain_event_grid(
        &self,
        p: &Principal,
        action: Action,
        request: Option<&Request<'_>>,
        out: &mut Vec<Consideration>,
    ) {
        let (ns, subject) = match self.event_grid_subject(p) {
            Ok(found) => found,
            Err(_) => return, // the decision's reason says why; nothing else was looked at
        };
        let Some(request) = request else {
            out.push(Consideration {
                rule: subject.connect_ref(ns),
                outcome: Outcome::Granted,
                detail: match subject {
                    Subject::Registered(_) => "registered and enabled".into(),
                    Subject::Token { .. } => {
                        "authenticated by a token of the namespace's issuer".into()
                    }
                },
            });
            return;
        };
        let index = match action {
            Action::Publish => &ns.publish,
            _ => &ns.subscribe,
        };
        let vars = subject.vars();
        for g in &index.grants {
            let group = ns.bindings[g.owner as usize].group as usize;
            let (outcome, detail) = if !subject.in_group(ns, group) {
                (
                    Outcome::NotForThisPrincipal,
                    format!(
                        "{} is not in client group {:?}",
                        subject.describe(),
                        ns.group_names[group]
                    ),
                )
            } else {
                judge(&g.template, request, &vars)
            };
            out.push(Consideration {
                rule: g.by.clone(),
                outcome,
                detail,
            });
        }
    }
}

fn judge(template: &Template, request: &Request<'_>, vars: &impl Vars) -> (Outcome, String) {
    if let Err(why) = template.usable(vars) {
        return (Outcome::Unusable, why.to_string());
    }
    let (what, t) = match request {
        Request::Publish(t) => ("topic", t),
        Request::Subscribe(f) => ("filter", f),
    };
    if request.matched_by(template, vars) {
        (
            Outcome::Granted,
            format!("{what} {t:?} is within {:?}", template.text),
        )
    } else {
        (
            Outcome::NoMatch,
            format!("{what} {t:?} is not within {:?}", template.text),
        )
    }
}

fn connect_ref(grant: &ConnectGrant, entry: Option<usize>) -> RuleRef {
    RuleRef::IotOperations {
        authorization: grant.authorization.clone(),
        rule: grant.rule_in_authorization,
        resource: grant.resource,
        entry,
        pattern: entry.map(|i| grant.client_ids[i].text.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn grant(text: &str) -> Grant {
        let template = Template::parse(text, Dialect::IotOperations).expect("valid template");
        Grant {
            owner: 0,
            by: RuleRef::IotOperations {
                authorization: "t".into(),
                rule: 0,
                resource: 0,
                entry: None,
                pattern: Some(template.text.clone()),
            },
            template,
        }
    }

    #[test]
    fn index_looks_only_at_grants_whose_first_level_can_match() {
        let mut index = TopicIndex::default();
        for i in 0..1000 {
            index.add(grant(&format!("area{i}/#")));
        }
        index.add(grant("+/shared"));
        index.add(grant("{principal.clientId}/inbox"));
        let p = Principal::new("c1");
        let vars = PrincipalVars(&p);
        let calls = Cell::new(0);
        let (calls, vars) = (&calls, &vars);
        let probe = |topic: &'static str| {
            move |g: &Grant| {
                calls.set(calls.get() + 1);
                g.template.matches_topic(topic, vars)
            }
        };

        let found = index.find("area500", vars, probe("area500/x"));
        assert_eq!(found.map(|g| &*g.template.text), Some("area500/#"));
        assert_eq!(
            calls.replace(0),
            1,
            "one literal bucket; later lists cannot win"
        );

        let found = index.find("c1", vars, probe("c1/inbox"));
        assert_eq!(
            found.map(|g| &*g.template.text),
            Some("{principal.clientId}/inbox")
        );
        assert_eq!(
            calls.replace(0),
            2,
            "the variable bucket and the wildcard list"
        );

        let found = index.find("nowhere", vars, probe("nowhere/x"));
        assert!(found.is_none());
        assert_eq!(calls.replace(0), 1, "only the wildcard list");

        // A wildcard request level can only be covered by a wildcard template level.
        let found = index.find("+", vars, |g| {
            calls.set(calls.get() + 1);
            g.template.covers_filter("+/shared", vars)
        });
        assert_eq!(found.map(|g| &*g.template.text), Some("+/shared"));
        assert_eq!(calls.replace(0), 1);
    }
}
