//! `Microsoft.IoTOperationsMQ` 2023-10-04-preview declarations: mq and its broker, listener,
//! authentication, authorization, diagnosticService, the MQTT bridge, Kafka and Data Lake connectors
//! and their topic maps. Every type of this spec is tracked (location + tags + extendedLocation) and
//! supports PATCH (tags and the `…ResourceUpdate` properties).

use crate::engine::registry::{DeclBuilder, NameRule, Presence, ResourceTypeDecl};

use super::check;
use super::iotoperationsmq_models as m;

/// Provider namespace.
pub const NAMESPACE: &str = "Microsoft.IoTOperationsMQ";

/// The only api-version of this contract.
pub const API_VERSIONS: &[&str] = &["2023-10-04-preview"];

/// All `Microsoft.IoTOperationsMQ` types, parents before children.
pub fn types() -> Vec<ResourceTypeDecl> {
    vec![
        decl::<m::MqProperties>(&["mq"], "An IoT MQ: the root of brokers and connectors.")
            .list_by_resource_group(true)
            .list_by_subscription(true)
            .validate(check::<m::MqProperties>)
            .build(),
        decl::<m::BrokerProperties>(&["mq", "broker"], "An MQ broker.")
            .validate(check::<m::BrokerProperties>)
            .build(),
        decl::<m::BrokerListenerProperties>(
            &["mq", "broker", "listener"],
            "An MQ broker listener.",
        )
        .validate(check::<m::BrokerListenerProperties>)
        .build(),
        decl::<m::BrokerAuthenticationProperties>(
            &["mq", "broker", "authentication"],
            "MQ broker authentication methods.",
        )
        .validate(check::<m::BrokerAuthenticationProperties>)
        .build(),
        decl::<m::BrokerAuthorizationProperties>(
            &["mq", "broker", "authorization"],
            "MQ broker authorization rules.",
        )
        .validate(check::<m::BrokerAuthorizationProperties>)
        .build(),
        decl::<m::DiagnosticServiceProperties>(
            &["mq", "diagnosticService"],
            "The MQ diagnostic service.",
        )
        .validate(check::<m::DiagnosticServiceProperties>)
        .build(),
        decl::<m::MqttBridgeConnectorProperties>(
            &["mq", "mqttBridgeConnector"],
            "An MQTT bridge connector to a remote broker.",
        )
        .validate(check::<m::MqttBridgeConnectorProperties>)
        .build(),
        decl::<m::MqttBridgeTopicMapProperties>(
            &["mq", "mqttBridgeConnector", "topicMap"],
            "The topic map of an MQTT bridge connector.",
        )
        .validate(check::<m::MqttBridgeTopicMapProperties>)
        .build(),
        decl::<m::KafkaConnectorProperties>(&["mq", "kafkaConnector"], "A Kafka connector.")
            .validate(check::<m::KafkaConnectorProperties>)
            .build(),
        decl::<m::KafkaTopicMapProperties>(
            &["mq", "kafkaConnector", "topicMap"],
            "The topic map of a Kafka connector.",
        )
        .validate(check::<m::KafkaTopicMapProperties>)
        .build(),
        decl::<m::DataLakeConnectorProperties>(
            &["mq", "dataLakeConnector"],
            "A Data Lake connector.",
        )
        .validate(check::<m::DataLakeConnectorProperties>)
        .build(),
        decl::<m::DataLakeConnectorTopicMapProperties>(
            &["mq", "dataLakeConnector", "topicMap"],
            "The topic map of a Data Lake connector.",
        )
        .validate(check::<m::DataLakeConnectorTopicMapProperties>)
        .build(),
    ]
}

/// Common shape of this spec's types; child types are listed by parent.
fn decl<P>(path: &[&'static str], description: &'static str) -> DeclBuilder<P>
where
    P: serde::de::DeserializeOwned + serde::Serialize + utoipa::ToSchema + Send + Sync + 'static,
{
    ResourceTypeDecl::new::<P>(NAMESPACE, path)
        .api_versions(API_VERSIONS)
        // Every name parameter of this spec: `^[a-zA-Z0-9-]{3,24}$`.
        .name_rule(NameRule::new(r"^[a-zA-Z0-9-]{3,24}$", 3, 24))
        .patch(true)
        .list_by_parent(path.len() > 1)
        .location(Presence::Required)
        .extended_location(Presence::Required)
        .description(description)
}
