//! The OpenAPI document, generated from the registry: one path per declared type (api-version as
//! an enum parameter), component schemas from the types' `ToSchema` properties, and the ARM
//! envelope around them. Committed at `openapi/openapi.json`; a test fails when it is stale
//! (regenerate with `UPDATE_OPENAPI=1 cargo test -p meridian-api openapi`).

use serde_json::{Value, json};
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, Ref,
        RefOr, ResponseBuilder, Schema,
        path::{OperationBuilder, ParameterBuilder, ParameterIn, PathItem, PathsBuilder},
        request_body::RequestBodyBuilder,
        schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
    },
};

use crate::{
    engine::registry::{Presence, Registry, ResourceTypeDecl},
    error::{ErrorDetail, ErrorResponse},
};

fn string_param(
    name: &str,
    location: ParameterIn,
    required: bool,
    desc: &str,
) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(location)
        .required(if required {
            utoipa::openapi::Required::True
        } else {
            utoipa::openapi::Required::False
        })
        .description(Some(desc))
        .schema(Some(
            ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
        ))
        .build()
}

fn component_name(decl: &ResourceTypeDecl) -> String {
    let mut name = decl.namespace.replace('.', "");
    for seg in &decl.type_path {
        let mut c = seg.chars();
        if let Some(first) = c.next() {
            name.push(first.to_ascii_uppercase());
            name.extend(c);
        }
    }
    name
}

fn path_template(decl: &ResourceTypeDecl, scope_rg: bool) -> (String, Vec<String>) {
    let mut path = if scope_rg {
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}".to_owned()
    } else {
        "/subscriptions/{subscriptionId}".to_owned()
    };
    path.push_str(&format!("/providers/{}", decl.namespace));
    let mut names = Vec::new();
    for seg in &decl.type_path {
        let param = format!("{}Name", seg.trim_end_matches('s'));
        path.push_str(&format!("/{seg}/{{{param}}}"));
        names.push(param);
    }
    (path, names)
}

fn json_response(desc: &str, schema: RefOr<Schema>) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(desc)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(schema)).build(),
        )
        .build()
}

/// Builds the OpenAPI document for `registry`.
pub fn document(registry: &Registry) -> OpenApi {
    let mut components = ComponentsBuilder::new()
        .schema(ErrorDetail::name(), ErrorDetail::schema())
        .schema(ErrorResponse::name(), ErrorResponse::schema())
        .schema(
            "SystemData",
            ObjectBuilder::new()
                .property(
                    "createdBy",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .property(
                    "createdByType",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .property(
                    "createdAt",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::DateTime,
                        ))),
                )
                .property(
                    "lastModifiedBy",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .property(
                    "lastModifiedByType",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .property(
                    "lastModifiedAt",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                            utoipa::openapi::KnownFormat::DateTime,
                        ))),
                ),
        )
        .schema(
            "ExtendedLocation",
            ObjectBuilder::new()
                .property(
                    "name",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .property(
                    "type",
                    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
                )
                .required("name")
                .required("type"),
        )
        .security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    let mut paths = PathsBuilder::new();
    let error = json_response("ARM error", Ref::from_schema_name("ErrorResponse").into());
    let string = || ObjectBuilder::new().schema_type(SchemaType::Type(Type::String));
    for decl in registry.types() {
        let name = component_name(decl);
        let (props_name, props_schema, deps) = decl.properties_schema();
        for (n, s) in deps {
            components = components.schema(n, s);
        }
        components = components.schema(props_name.clone(), props_schema);
        let mut envelope = ObjectBuilder::new()
            .description(Some(decl.description.to_string()))
            .property("id", string())
            .property("name", string())
            .property("type", string())
            .property("etag", string())
            .property("systemData", Ref::from_schema_name("SystemData"))
            .property(
                "tags",
                ObjectBuilder::new().additional_properties(Some(string())),
            )
            .property("properties", Ref::from_schema_name(props_name.clone()));
        if decl.location != Presence::Absent {
            envelope = envelope.property("location", string());
            if decl.location == Presence::Required {
                envelope = envelope.required("location");
            }
        }
        if decl.extended_location != Presence::Absent {
            envelope = envelope.property(
                "extendedLocation",
                Ref::from_schema_name("ExtendedLocation"),
            );
            if decl.extended_location == Presence::Required {
                envelope = envelope.required("extendedLocation");
            }
        }
        for (field, schema_name, schema, deps) in decl.top_level_schemas() {
            for (n, s) in deps {
                components = components.schema(n, s);
            }
            components = components.schema(schema_name.clone(), schema);
            envelope = envelope.property(field, Ref::from_schema_name(schema_name));
        }
        components = components.schema(name.clone(), envelope);
        components = components.schema(
            format!("{name}ListResult"),
            ObjectBuilder::new()
                .property(
                    "value",
                    ArrayBuilder::new().items(Ref::from_schema_name(name.clone())),
                )
                .property("nextLink", string()),
        );

        let api_version = ParameterBuilder::new()
            .name("api-version")
            .parameter_in(ParameterIn::Query)
            .required(utoipa::openapi::Required::True)
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .enum_values(Some(decl.api_versions.iter().map(|v| v.to_string()))),
            ))
            .build();
        let rg_scoped = !decl
            .namespace
            .eq_ignore_ascii_case(crate::engine::AUTHORIZATION_NAMESPACE);
        let (item_path, names) = path_template(decl, true);
        let mut params = vec![
            string_param("subscriptionId", ParameterIn::Path, true, "Subscription id"),
            string_param(
                "resourceGroupName",
                ParameterIn::Path,
                true,
                "Resource group",
            ),
        ];
        for n in &names {
            params.push(string_param(n, ParameterIn::Path, true, "Resource name"));
        }
        params.push(api_version.clone());
        let resource_ref: RefOr<Schema> = Ref::from_schema_name(name.clone()).into();
        let type_name = decl.type_name();
        let tag = type_name.clone();
        let op = |verb: &str| {
            OperationBuilder::new()
                .tag(tag.clone())
                .operation_id(Some(format!("{name}_{verb}")))
                .parameters(Some(params.clone()))
                .security(SecurityRequirement::new::<_, _, String>("bearer", []))
                .response("default", error.clone())
        };
        let mut item = PathItem::new(
            HttpMethod::Get,
            op("Get").response("200", json_response("The resource", resource_ref.clone())),
        );
        let body = RequestBodyBuilder::new()
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(resource_ref.clone()))
                    .build(),
            )
            .required(Some(utoipa::openapi::Required::True))
            .build();
        item.put = Some(
            op("CreateOrUpdate")
                .request_body(Some(body.clone()))
                .response("200", json_response("Updated", resource_ref.clone()))
                .response(
                    "201",
                    json_response("Created; poll Azure-AsyncOperation", resource_ref.clone()),
                )
                .build(),
        );
        item.delete = Some(
            op("Delete")
                .response(
                    "202",
                    ResponseBuilder::new()
                        .description("Deleting; poll Location")
                        .build(),
                )
                .response(
                    "204",
                    ResponseBuilder::new().description("Did not exist").build(),
                )
                .build(),
        );
        if decl.verbs.patch {
            item.patch = Some(
                op("Update")
                    .request_body(Some(body))
                    .response("200", json_response("Updated", resource_ref.clone()))
                    .build(),
            );
        }
        let item_path = if rg_scoped {
            item_path
        } else {
            path_template(decl, false).0
        };
        paths = paths.path(item_path.clone(), item);

        let list_ref: RefOr<Schema> = Ref::from_schema_name(format!("{name}ListResult")).into();
        let list_op = |verb: &str, params: Vec<utoipa::openapi::path::Parameter>| {
            let mut params = params;
            params.push(string_param("$top", ParameterIn::Query, false, "Page size"));
            params.push(string_param(
                "$skipToken",
                ParameterIn::Query,
                false,
                "Continuation token from nextLink",
            ));
            PathItem::new(
                HttpMethod::Get,
                OperationBuilder::new()
                    .tag(tag.clone())
                    .operation_id(Some(format!("{name}_{verb}")))
                    .parameters(Some(params))
                    .security(SecurityRequirement::new::<_, _, String>("bearer", []))
                    .response("200", json_response("A page", list_ref.clone()))
                    .response("default", error.clone()),
            )
        };
        let last = decl
            .type_path
            .last()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if decl.verbs.list_by_parent {
            let collection = item_path
                .rsplit_once('/')
                .map(|x| x.0)
                .unwrap_or_default()
                .to_owned();
            let mut p = params.clone();
            p.retain(|x| x.name != *names.last().unwrap_or(&String::new()));
            paths = paths.path(collection, list_op("ListByParent", p));
        }
        if decl.verbs.list_by_resource_group && rg_scoped {
            paths = paths.path(
                format!("/subscriptions/{{subscriptionId}}/resourceGroups/{{resourceGroupName}}/providers/{}/{last}", decl.namespace),
                list_op("ListByResourceGroup", params[..2].iter().cloned().chain([api_version.clone()]).collect()),
            );
        }
        if decl.verbs.list_by_subscription {
            paths = paths.path(
                format!(
                    "/subscriptions/{{subscriptionId}}/providers/{}/{last}",
                    decl.namespace
                ),
                list_op(
                    "ListBySubscription",
                    vec![params[0].clone(), api_version.clone()],
                ),
            );
        }
    }
    let (paths, components) = node_paths(paths, components);
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Meridian control plane")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("An Azure-Resource-Manager-style resource provider for Microsoft.IoTOperations, Microsoft.IoTOperationsMQ and the MQTT subset of Microsoft.EventGrid."))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components.build()))
        .build()
}

/// The broker-node routes (`meridian_contract::node`) and their schemas. The contract crate has no
/// utoipa dependency, so the schemas are written out here; a test compares them with the types.
fn node_paths(
    paths: PathsBuilder,
    components: ComponentsBuilder,
) -> (PathsBuilder, ComponentsBuilder) {
    let string = |desc: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some(desc))
    };
    let integer = |desc: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Integer))
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(0))
            .description(Some(desc))
    };
    let components = components
        .schema(
            "NodeError",
            ObjectBuilder::new()
                .description(Some("One error a node reports."))
                .property("generation", integer("The generation the error is about (0 = none)."))
                .property("resourceId", string("The resource at fault, when known."))
                .property("message", string("What went wrong."))
                .required("message"),
        )
        .schema(
            "NodeReport",
            ObjectBuilder::new()
                .description(Some("What a broker node reports on start and at every interval."))
                .property("brokerId", string("ARM id of the broker resource the node serves."))
                .property("endpoint", string("Where the control plane pushes snapshots (http://host:port)."))
                .property("appliedGeneration", integer("Generation of the snapshot the node serves (0 = none)."))
                .property("appliedDigest", string("Digest of that snapshot (\"\" = none)."))
                .property(
                    "health",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .enum_values(Some(["Healthy", "Degraded"])),
                )
                .property("connectedClients", integer("Connected MQTT clients."))
                .property(
                    "errors",
                    ArrayBuilder::new().items(Ref::from_schema_name("NodeError")),
                )
                .required("brokerId")
                .required("endpoint"),
        )
        .schema(
            "ReportAnswer",
            ObjectBuilder::new()
                .description(Some("The control plane's answer to a node report."))
                .property("desiredGeneration", integer("Newest generation for the node's broker (0 = none yet); a node behind it is pushed it."))
                .property("reportIntervalSeconds", integer("How often the node should report."))
                .required("desiredGeneration")
                .required("reportIntervalSeconds"),
        )
        .schema(
            "ExplainRequest",
            ObjectBuilder::new()
                .description(Some("May this client do this on this broker, and which rule or binding decides?"))
                .property("brokerId", string("ARM id of the broker (IoT Operations or MQ 2023)."))
                .property("clientId", string("The MQTT client identifier."))
                .property("username", string("The authenticated username (password user, certificate CN, token sub)."))
                .property(
                    "attributes",
                    ObjectBuilder::new()
                        .additional_properties(Some(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String))))
                        .description(Some("Attributes from authentication (IoT Operations rules).")),
                )
                .property("namespace", string("An Event Grid namespace bound to the broker: judge the client by its bindings."))
                .property("authenticationName", string("Event Grid authentication name (default: clientId)."))
                .property(
                    "action",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .enum_values(Some(["Connect", "Publish", "Subscribe"])),
                )
                .property("topic", string("Topic (Publish) or filter (Subscribe); ignored for Connect."))
                .property(
                    "authorizations",
                    ArrayBuilder::new().items(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String))),
                )
                .required("brokerId")
                .required("clientId")
                .required("action"),
        )
        .schema(
            "ExplainAnswer",
            ObjectBuilder::new()
                .description(Some("The decision and the reasoning: every rule or binding that could bear on the request and why it did or did not grant it."))
                .property("allowed", ObjectBuilder::new().schema_type(SchemaType::Type(Type::Boolean)))
                .property("brokerId", string("The broker."))
                .property("principal", ObjectBuilder::new().description(Some("Who was judged.")))
                .property("explanation", ObjectBuilder::new().description(Some("action, topic, decision {allowed, by, reason}, considered [{rule, outcome, detail}].")))
                .required("allowed")
                .required("explanation"),
        )
        .schema(
            "NodeView",
            ObjectBuilder::new()
                .description(Some("The control plane's view of one node."))
                .property("nodeId", string("The node's id."))
                .property(
                    "state",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::Type(Type::String))
                        .enum_values(Some(["Healthy", "Degraded", "Unhealthy"]))
                        .description(Some("As reported, or Unhealthy after missed reports.")),
                )
                .property("lastSeen", string("RFC 3339 time of the last report."))
                .property("report", Ref::from_schema_name("NodeReport"))
                .required("nodeId")
                .required("state")
                .required("lastSeen")
                .required("report"),
        )
        .schema(
            "NodeList",
            ObjectBuilder::new()
                .property("value", ArrayBuilder::new().items(Ref::from_schema_name("NodeView")))
                .required("value"),
        );
    let error = json_response("ARM error", Ref::from_schema_name("ErrorResponse").into());
    let report = OperationBuilder::new()
        .tag("Meridian nodes")
        .operation_id(Some("Nodes_Report"))
        .summary(Some("Register a broker node or report its status"))
        .description(Some("Needs Contributor on the broker's resource group or subscription. The bearer token is presented back to the node when the control plane pushes snapshots to it."))
        .parameters(Some([string_param("nodeId", ParameterIn::Path, true, "Node id: 1-128 letters, digits, '.', '_' or '-'")]))
        .request_body(Some(
            RequestBodyBuilder::new()
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("NodeReport")))
                        .build(),
                )
                .required(Some(utoipa::openapi::Required::True))
                .build(),
        ))
        .security(SecurityRequirement::new::<_, _, String>("bearer", []))
        .response("200", json_response("Recorded", Ref::from_schema_name("ReportAnswer").into()))
        .response("default", error.clone());
    let list = OperationBuilder::new()
        .tag("Meridian nodes")
        .operation_id(Some("Nodes_List"))
        .summary(Some("List broker nodes and their status"))
        .description(Some(
            "Needs Reader; without brokerId, lists the nodes of the brokers the caller may read.",
        ))
        .parameters(Some([string_param(
            "brokerId",
            ParameterIn::Query,
            false,
            "Only the nodes of this broker (ARM id)",
        )]))
        .security(SecurityRequirement::new::<_, _, String>("bearer", []))
        .response(
            "200",
            json_response("The nodes", Ref::from_schema_name("NodeList").into()),
        )
        .response("default", error.clone());
    let explain = OperationBuilder::new()
        .tag("Meridian authorization")
        .operation_id(Some("Authorization_Explain"))
        .summary(Some("Explain an authorization decision"))
        .description(Some("Compiles the broker's desired state exactly as it is pushed to nodes and answers whether the client may connect, publish or subscribe, naming the deciding rule or binding. Needs Reader on the broker's scope."))
        .request_body(Some(
            RequestBodyBuilder::new()
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ExplainRequest")))
                        .build(),
                )
                .required(Some(utoipa::openapi::Required::True))
                .build(),
        ))
        .security(SecurityRequirement::new::<_, _, String>("bearer", []))
        .response("200", json_response("The decision", Ref::from_schema_name("ExplainAnswer").into()))
        .response("default", error);
    let paths = paths
        .path(
            "/meridian/authz/explain",
            PathItem::new(HttpMethod::Post, explain),
        )
        .path("/meridian/nodes", PathItem::new(HttpMethod::Get, list))
        .path(
            "/meridian/nodes/{nodeId}",
            PathItem::new(HttpMethod::Put, report),
        );
    (paths, components)
}

/// The document for the served types (`resources::all_types()` plus built-ins), as committed in
/// `openapi/openapi.json` (pretty JSON with a trailing newline). `meridian openapi` can print it.
pub fn current_json() -> String {
    let registry = crate::engine::full_registry(crate::resources::all_types());
    let doc = document(&registry);
    let mut text = serde_json::to_string_pretty(&doc).expect("OpenAPI documents serialize");
    text.push('\n');
    text
}

/// The `GET /providers/{ns}/operations` list for `namespace` (empty when unknown).
pub fn provider_operations(registry: &Registry, namespace: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for decl in registry
        .types()
        .iter()
        .filter(|t| t.namespace.eq_ignore_ascii_case(namespace))
    {
        let ty = decl.type_name();
        let mut verbs = vec![
            ("read", "Read"),
            ("write", "Create or update"),
            ("delete", "Delete"),
        ];
        if decl.verbs.patch {
            verbs.push(("write", "Update"));
        }
        verbs.dedup_by(|a, b| a.0 == b.0);
        for (verb, what) in verbs {
            out.push(json!({
                "name": format!("{ty}/{verb}"),
                "isDataAction": false,
                "origin": "user,system",
                "display": {
                    "provider": decl.namespace,
                    "resource": decl.type_path.last(),
                    "operation": format!("{what} {}", decl.type_path.last().map(|s| s.as_ref()).unwrap_or("")),
                    "description": format!("{what} a {ty} resource."),
                }
            }));
        }
    }
    out
}
