"""`meridian apply -f template.json` end to end: the CLI sends an ARM template with parameters,
dependsOn, resourceId()/concat() and outputs to a running `meridian api` over HTTPS; the resources
exist afterwards, and a template with an unknown function is refused with nothing written."""
import json
import subprocess

import requests

from conftest import SUBSCRIPTION, _binary

TEMPLATE = {
    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
    "contentVersion": "1.0.0.0",
    "parameters": {"ns": {"type": "string", "defaultValue": "ns-apply"}},
    "resources": [
        {"type": "Microsoft.EventGrid/namespaces", "apiVersion": "2025-02-15",
         "name": "[parameters('ns')]", "location": "westus", "properties": {}},
        {"type": "Microsoft.EventGrid/namespaces/topicSpaces", "apiVersion": "2025-02-15",
         "name": "[concat(parameters('ns'), '/ts1')]",
         "dependsOn": ["[resourceId('Microsoft.EventGrid/namespaces', parameters('ns'))]"],
         "properties": {"topicTemplates": ["devices/#"]}},
    ],
    "outputs": {"id": {"type": "string",
                       "value": "[resourceId('Microsoft.EventGrid/namespaces', parameters('ns'))]"}},
}


def apply(api, tmp_path, template, *extra):
    f = tmp_path / "template.json"
    f.write_text(json.dumps(template))
    return subprocess.run([_binary(), "apply", "-f", str(f), "--url", api.base_url, "--token", api.token,
                           "--subscription", SUBSCRIPTION, "-g", "rg-apply", "--ca-file", api.ca_path, *extra],
                          capture_output=True, text=True, timeout=120)


def test_apply_deploys_a_template_in_dependency_order(api, tmp_path):
    out = apply(api, tmp_path, TEMPLATE, "-p", "ns=ns-cli")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "/namespaces/ns-cli" in out.stdout
    url = (f"{api.base_url}/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-apply/providers/"
           "Microsoft.EventGrid/namespaces/ns-cli/topicSpaces/ts1?api-version=2025-02-15")
    r = requests.get(url, headers={"Authorization": f"Bearer {api.token}"}, verify=api.ca_path)
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["topicTemplates"] == ["devices/#"]


def test_apply_refuses_an_unknown_function_and_writes_nothing(api, tmp_path):
    bad = json.loads(json.dumps(TEMPLATE))
    # The unknown function sits in the second resource: validation must refuse the whole template
    # before the first one (the namespace) is written.
    bad["resources"][1]["properties"]["topicTemplates"] = ["[nosuchfunction('x')]"]
    bad["parameters"]["ns"]["defaultValue"] = "ns-bad"
    out = apply(api, tmp_path, bad)
    assert out.returncode != 0
    assert "nosuchfunction" in (out.stderr + out.stdout)
    url = (f"{api.base_url}/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-apply/providers/"
           "Microsoft.EventGrid/namespaces/ns-bad?api-version=2025-02-15")
    r = requests.get(url, headers={"Authorization": f"Bearer {api.token}"}, verify=api.ca_path)
    assert r.status_code == 404, r.text
