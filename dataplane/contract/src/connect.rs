//! Bridges (MQ `mqttBridgeConnector` + `topicMap`) and dataflows (IoT Operations endpoints,
//! profiles, dataflows). Typed where a node acts on a field, lenient everywhere: fields the contract
//! does not model are kept in `extra` (spec spelling), so nothing a resource says is lost on the
//! way to the node.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One MQTT bridge connector with its topic maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bridge {
    /// ARM id of the connector.
    pub id: String,
    /// Connector name.
    pub name: String,
    /// MQTT version to the remote broker: `v3` or `v5` (spec spelling).
    #[serde(default)]
    pub protocol: String,
    /// Prefix of the client ids the bridge uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_prefix: Option<String>,
    /// The spec's `bridgeInstances` (parallel connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_instances: Option<u32>,
    /// The remote broker.
    pub remote_broker_connection: RemoteBrokerConnection,
    /// The spec's `localBrokerConnection` (endpoint, TLS, auth toward the local broker), carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_broker_connection: Option<Value>,
    /// Topic maps under this connector (its `topicMap` children), sorted by id.
    #[serde(default)]
    pub topic_maps: Vec<BridgeTopicMap>,
    /// Other spec fields (image, logLevel, nodeTolerations, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Spec `MqttBridgeRemoteBrokerConnectionSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteBrokerConnection {
    /// `host:port`.
    #[serde(default)]
    pub endpoint: String,
    /// `mqtt` or `webSocket` (spec spelling; absent means `mqtt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `{tlsEnabled, trustedCaCertificateConfigMap}`, carried as the spec has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Value>,
    /// `{x509: {secretName|keyVault}, systemAssignedManagedIdentity: {audience}}`, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Value>,
    /// Other spec fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One `mqttBridgeConnector/topicMap/{t}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeTopicMap {
    /// ARM id of the topic map.
    pub id: String,
    /// Topic map name.
    pub name: String,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<BridgeRoute>,
}

/// Spec `MqttBridgeRoutes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeRoute {
    /// Route name.
    pub name: String,
    /// `remote-to-local` or `local-to-remote` (spec spelling).
    pub direction: String,
    /// Source topic filter.
    pub source: String,
    /// Target topic (absent: same as the message's topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// QoS of the bridged messages (the spec's default is 1).
    #[serde(default = "default_route_qos")]
    pub qos: u8,
    /// `{groupName, groupMinimumShareNumber}`, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_subscription: Option<Value>,
    /// Other spec fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_route_qos() -> u8 {
    1
}

/// One `instances/{i}/dataflowEndpoints/{e}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowEndpoint {
    /// ARM id.
    pub id: String,
    /// Endpoint name (what dataflow operations' `endpointRef` names).
    pub name: String,
    /// Spec `endpointType` (`Mqtt`, `Kafka`, `LocalStorage`, ...). Nodes run `Mqtt`; the others
    /// are carried.
    pub endpoint_type: String,
    /// `mqttSettings`, typed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_settings: Option<MqttEndpointSettings>,
    /// Other spec fields (`kafkaSettings`, `localStorageSettings`, ...), carried.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Spec `DataflowEndpointMqtt`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MqttEndpointSettings {
    /// `host:port` of the broker (spec default: the local broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `Mqtt` or `WebSockets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Client id prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_prefix: Option<String>,
    /// Keep alive, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_seconds: Option<u32>,
    /// QoS of published messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// `Keep` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<String>,
    /// Session expiry, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_expiry_seconds: Option<u32>,
    /// In-flight window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight_messages: Option<u32>,
    /// `{mode, trustedCaCertificateConfigMapRef}`, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Value>,
    /// `{method, ...Settings}`, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Value>,
    /// Other spec fields (`cloudEventAttributes`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One `instances/{i}/dataflowProfiles/{p}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowProfile {
    /// ARM id.
    pub id: String,
    /// Profile name.
    pub name: String,
    /// Spec `instanceCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_count: Option<u32>,
    /// Other spec fields (`diagnostics`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One `dataflowProfiles/{p}/dataflows/{d}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dataflow {
    /// ARM id.
    pub id: String,
    /// Dataflow name.
    pub name: String,
    /// The profile it belongs to (its parent's name).
    pub profile_name: String,
    /// Spec `mode`: `Enabled` (default) or `Disabled`.
    #[serde(default = "default_enabled")]
    pub mode: String,
    /// Source, transformations, destination, in order.
    #[serde(default)]
    pub operations: Vec<DataflowOperation>,
    /// Other spec fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_enabled() -> String {
    "Enabled".to_owned()
}

/// Spec `DataflowOperation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowOperation {
    /// `Source`, `Destination` or `BuiltInTransformation`.
    pub operation_type: String,
    /// Optional operation name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `Source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_settings: Option<DataflowSource>,
    /// For `BuiltInTransformation`, carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_in_transformation_settings: Option<Value>,
    /// For `Destination`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_settings: Option<DataflowDestination>,
    /// Other spec fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Spec `DataflowSourceOperationSettings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowSource {
    /// The endpoint to read from (`default` is the local broker in IoT Operations).
    pub endpoint_ref: String,
    /// Topic filters (MQTT) or topics (Kafka).
    #[serde(default)]
    pub data_sources: Vec<String>,
    /// Other spec fields (`assetRef`, `serializationFormat`, `schemaRef`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Spec `DataflowDestinationOperationSettings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataflowDestination {
    /// The endpoint to write to.
    pub endpoint_ref: String,
    /// Topic (MQTT/Kafka) or path/table, by endpoint type.
    pub data_destination: String,
    /// Other spec fields (`headers`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
