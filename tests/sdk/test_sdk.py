"""The published Azure SDKs against a running `meridian api` (HTTPS, Postgres, bearer token):
create (LRO poller to the end), get, list, update and delete (LRO poller) for every resource type
of `azure-mgmt-iotoperations` 1.2.0 (api-version 2026-07-01) and `azure-mgmt-eventgrid` 10.4.0
(2025-02-15) that Meridian serves; `Microsoft.IoTOperationsMQ` (no published SDK) through the same
azure-core pipeline with raw requests.

Run: `python -m pytest tests/sdk -q` (MERIDIAN_BIN=path/to/meridian, SDK_STORE=sqlite to skip
Postgres).
"""

import time

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.mgmt.eventgrid import EventGridManagementClient
from azure.mgmt.iotoperations import IoTOperationsMgmtClient

from conftest import SUBSCRIPTION

RG = "sdk-rg"
CUSTOM_LOCATION = {
    "name": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RG}/providers/Microsoft.ExtendedLocation/customLocations/edge",
    "type": "CustomLocation",
}


class StaticToken:
    """A TokenCredential returning the token `meridian token` minted."""

    def __init__(self, token: str):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        return AccessToken(self._token, int(time.time()) + 3600)


def clients(api):
    cred = StaticToken(api.token)
    kw = {"base_url": api.base_url, "connection_verify": api.ca_path,
          "credential_scopes": ["https://management.azure.com/.default"], "polling_interval": 0.1}
    return (IoTOperationsMgmtClient(cred, SUBSCRIPTION, **kw),
            EventGridManagementClient(cred, SUBSCRIPTION, **kw))


def body(props, **extra):
    return {"extendedLocation": CUSTOM_LOCATION, "properties": props, **extra}


def names(pageable):
    return sorted(r.name for r in pageable)


def test_iot_operations_sdk_every_type(api):
    iot, _ = clients(api)
    inst = "sdk-inst"
    created = iot.instance.begin_create_or_update(RG, inst, body(
        {"schemaRegistryRef": {"resourceId": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RG}/providers/Microsoft.DeviceRegistry/schemaRegistries/sr"},
         "description": "first"}, location="westeurope", tags={"env": "sdk"})).result()
    assert created.properties.provisioning_state == "Succeeded"
    assert iot.instance.get(RG, inst).properties.description == "first"
    assert inst in names(iot.instance.list_by_resource_group(RG))
    assert inst in names(iot.instance.list_by_subscription())
    patched = iot.instance.update(RG, inst, {"tags": {"env": "patched"}})
    assert patched.tags == {"env": "patched"}

    # Children: (operations group, name args, create body, a field to update, its new value, getter).
    children = [
        (iot.broker, ("broker",), {}, "memoryProfile", "Low", lambda r: r.properties.memory_profile),
        (iot.broker_listener, ("broker", "listener"), {"ports": [{"port": 1883}]},
         "serviceName", "aio-broker-sdk", lambda r: r.properties.service_name),
        (iot.broker_authentication, ("broker", "authn"),
         {"authenticationMethods": [{"method": "ServiceAccountToken", "serviceAccountTokenSettings": {"audiences": ["aio-internal"]}}]},
         "authenticationMethods",
         [{"method": "ServiceAccountToken", "serviceAccountTokenSettings": {"audiences": ["other"]}}],
         lambda r: r.properties.authentication_methods[0].service_account_token_settings.audiences),
        (iot.broker_authorization, ("broker", "authz"),
         {"authorizationPolicies": {"rules": [{"principals": {"clientIds": ["c1"]}, "brokerResources": [{"method": "Connect"}]}]}},
         "authorizationPolicies", {"cache": "Disabled", "rules": []},
         lambda r: r.properties.authorization_policies.cache),
        (iot.dataflow_endpoint, ("endpoint",),
         {"endpointType": "Mqtt", "mqttSettings": {"host": "aio-broker:18883", "authentication": {"method": "Anonymous"}}},
         "endpointType", "Mqtt", lambda r: r.properties.endpoint_type),
        (iot.dataflow_profile, ("profile",), {"instanceCount": 1}, "instanceCount", 2,
         lambda r: r.properties.instance_count),
        (iot.dataflow, ("profile", "flow"),
         {"operations": [
             {"operationType": "Source", "sourceSettings": {"endpointRef": "endpoint", "dataSources": ["a/+"]}},
             {"operationType": "Destination", "destinationSettings": {"endpointRef": "endpoint", "dataDestination": "b"}}]},
         "mode", "Disabled", lambda r: r.properties.mode),
    ]
    for ops, args, props, field, new_value, read in children:
        res = ops.begin_create_or_update(RG, inst, *args, body(props)).result()
        assert res.properties.provisioning_state == "Succeeded", (ops, res)
        got = ops.get(RG, inst, *args)
        assert got.name == args[-1]
        assert args[-1] in names(ops.list_by_resource_group(RG, inst, *args[:-1]))
        # Update: these types have no PATCH; a second PUT replaces (200) and the poller completes.
        updated = ops.begin_create_or_update(RG, inst, *args, body({**props, field: new_value})).result()
        # What `read` returns after the update (nested fields for the object-valued updates).
        expected = {"authenticationMethods": ["other"], "authorizationPolicies": "Disabled"}.get(field, new_value)
        assert read(updated) == expected, (ops, updated)
        assert read(ops.get(RG, inst, *args)) == expected

    # Delete children (leaf first), each poller to the end, then the instance.
    for ops, args, *_ in reversed(children):
        ops.begin_delete(RG, inst, *args).result()
        with pytest.raises(ResourceNotFoundError):
            ops.get(RG, inst, *args)
    iot.instance.begin_delete(RG, inst).result()
    with pytest.raises(ResourceNotFoundError):
        iot.instance.get(RG, inst)


def test_event_grid_sdk_every_type(api):
    _, eg = clients(api)
    ns = "sdk-ns"
    created = eg.namespaces.begin_create_or_update(RG, ns, {
        "location": "westeurope", "sku": {"name": "Standard", "capacity": 1},
        "properties": {"topicSpacesConfiguration": {"state": "Enabled"}}}).result()
    assert created.provisioning_state == "Succeeded"
    assert eg.namespaces.get(RG, ns).topic_spaces_configuration.state == "Enabled"
    assert ns in names(eg.namespaces.list_by_resource_group(RG))
    assert ns in names(eg.namespaces.list_by_subscription())
    updated = eg.namespaces.begin_update(RG, ns, {"tags": {"env": "patched"}}).result()
    assert updated.tags == {"env": "patched"}

    children = [
        (eg.topic_spaces, "ts1", {"topicTemplates": ["devices/${client.authenticationName}/#"]},
         {"description": "updated"}, lambda r: r.description),
        (eg.client_groups, "cg1", {"query": "attributes.type = 'sensor'"},
         {"description": "updated"}, lambda r: r.description),
        (eg.permission_bindings, "pb1", {"topicSpaceName": "ts1", "clientGroupName": "cg1", "permission": "Publisher"},
         {"permission": "Subscriber"}, lambda r: r.permission),
        (eg.clients, "dev1", {"authenticationName": "dev1", "state": "Enabled", "attributes": {"type": "sensor"}},
         {"state": "Disabled"}, lambda r: r.state),
        (eg.ca_certificates, "ca1", {"encodedCertificate": "MIIBtest"},
         {"description": "updated"}, lambda r: r.description),
    ]
    for ops, name, props, change, read in children:
        res = ops.begin_create_or_update(RG, ns, name, {"properties": props}).result()
        assert res.provisioning_state == "Succeeded", (ops, res)
        assert ops.get(RG, ns, name).name == name
        assert name in names(ops.list_by_namespace(RG, ns))
        res = ops.begin_create_or_update(RG, ns, name, {"properties": {**props, **change}}).result()
        assert read(res) == list(change.values())[0]
        assert read(ops.get(RG, ns, name)) == list(change.values())[0]
    for ops, name, *_ in reversed(children):
        ops.begin_delete(RG, ns, name).result()
        with pytest.raises(ResourceNotFoundError):
            ops.get(RG, ns, name)
    eg.namespaces.begin_delete(RG, ns).result()
    with pytest.raises(ResourceNotFoundError):
        eg.namespaces.get(RG, ns)


def test_iot_operations_mq_through_the_azure_core_pipeline(api):
    """No SDK is published for Microsoft.IoTOperationsMQ; drive it through the IoT Operations
    client's azure-core pipeline (same auth, TLS and retry policies) with raw requests."""
    iot, _ = clients(api)
    v = "2023-10-04-preview"
    base = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RG}/providers/Microsoft.IoTOperationsMQ"
    image = {"repository": "mcr.microsoft.com/azureiotoperations/x", "tag": "1.0"}
    tracked = {"location": "westeurope", "extendedLocation": CUSTOM_LOCATION}
    types = [
        ("mq/mq1", {}),
        ("mq/mq1/broker/broker", {"authImage": image, "brokerImage": image, "healthManagerImage": image, "mode": "auto"}),
        ("mq/mq1/broker/broker/listener/listener", {"brokerRef": "broker", "port": 1883}),
        ("mq/mq1/broker/broker/authentication/authn", {"authenticationMethods": [{"sat": {"audiences": ["aio-mq"]}}], "listenerRef": ["listener"]}),
        ("mq/mq1/broker/broker/authorization/authz", {"authorizationPolicies": {"enableCache": True, "rules": []}, "listenerRef": ["listener"]}),
        ("mq/mq1/diagnosticService/diag", {"image": image}),
        ("mq/mq1/mqttBridgeConnector/bridge", {"image": image, "protocol": "v5", "remoteBrokerConnection": {"authentication": {}, "endpoint": "remote:8883", "tls": {"tlsEnabled": True}}}),
        ("mq/mq1/mqttBridgeConnector/bridge/topicMap/map", {"mqttBridgeConnectorRef": "bridge"}),
        ("mq/mq1/kafkaConnector/kafka", {"kafkaConnection": {"authentication": {"enabled": False}, "endpoint": "kafka:9093", "tls": {"tlsEnabled": True}}}),
        ("mq/mq1/kafkaConnector/kafka/topicMap/map", {"kafkaConnectorRef": "kafka", "routes": [{"mqttToKafka": {"name": "r1", "mqttTopic": "a/b", "kafkaTopic": "k", "kafkaAcks": "one"}}]}),
        ("mq/mq1/dataLakeConnector/lake", {"databaseFormat": "delta", "image": image, "protocol": "v5", "target": {"localStorage": {"volumeName": "vol"}}}),
        ("mq/mq1/dataLakeConnector/lake/topicMap/map", {"dataLakeConnectorRef": "lake", "mapping": {
            "allowedLatencySecs": 1, "clientId": "c1", "maxMessagesPerBatch": 10, "messagePayloadType": "json",
            "mqttSourceTopic": "a/b", "table": {"tableName": "t", "schema": [{"format": "utf8", "mapping": "$property.x", "name": "x", "optional": False}]}}}),
    ]

    def send(method, path, json=None):
        req = HttpRequest(method, f"{api.base_url}{base}/{path}", params={"api-version": v}, json=json)
        return iot._client.send_request(req)

    def wait_async(resp):
        monitor = resp.headers.get("Azure-AsyncOperation")
        for _ in range(100):
            if monitor is None:
                return
            status = iot._client.send_request(HttpRequest("GET", monitor if monitor.startswith("https://") else api.base_url + monitor)).json()["status"]
            if status in ("Succeeded", "Failed", "Canceled"):
                assert status == "Succeeded"
                return
            time.sleep(0.1)
        raise AssertionError("operation did not finish")

    for path, props in types:
        resp = send("PUT", path, {**tracked, "properties": props})
        assert resp.status_code == 201, resp.text()
        wait_async(resp)
        got = send("GET", path)
        assert got.status_code == 200 and got.json()["properties"]["provisioningState"] == "Succeeded", got.text()
        listed = send("GET", path.rsplit("/", 1)[0])
        assert any(r["name"] == path.rsplit("/", 1)[1] for r in listed.json()["value"]), listed.text()
        patched = send("PATCH", path, {"tags": {"env": "patched"}})
        assert patched.status_code in (200, 202), patched.text()
        assert send("GET", path).json()["tags"] == {"env": "patched"}
    for path, _ in reversed(types):
        resp = send("DELETE", path)
        assert resp.status_code in (202, 204), resp.text()
        for _ in range(100):
            if send("GET", path).status_code == 404:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"{path} not deleted")
