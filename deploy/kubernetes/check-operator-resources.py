#!/usr/bin/env python3
"""Checks the Prometheus-operator resources of a rendered manifest, which kubernetes-validate has
no schemas for: the ServiceMonitor must select a Service of the same manifest by its labels and
scrape one of that Service's named ports; the PrometheusRule's groups must equal
deploy/prometheus/rules.yml (which promtool checks and unit-tests) and pass `promtool check
rules` themselves. Usage: check-operator-resources.py RENDERED.yaml RULES.yml"""

import subprocess
import sys
import tempfile

import yaml


def fail(message):
    print(f"check-operator-resources: {message}", file=sys.stderr)
    sys.exit(1)


def main(rendered_path, rules_path):
    with open(rendered_path, encoding="utf-8") as handle:
        documents = [doc for doc in yaml.safe_load_all(handle) if doc]
    by_kind = {}
    for doc in documents:
        by_kind.setdefault(doc["kind"], []).append(doc)

    monitors = by_kind.get("ServiceMonitor", [])
    rules = by_kind.get("PrometheusRule", [])
    if not monitors or not rules:
        fail("expected a ServiceMonitor and a PrometheusRule")

    services = by_kind.get("Service", [])
    for monitor in monitors:
        if monitor["apiVersion"] != "monitoring.coreos.com/v1":
            fail(f"ServiceMonitor apiVersion {monitor['apiVersion']}")
        spec = monitor["spec"]
        wanted = spec["selector"]["matchLabels"]
        selected = [
            service
            for service in services
            if wanted.items() <= (service["metadata"].get("labels") or {}).items()
            and service["metadata"].get("namespace") == monitor["metadata"].get("namespace")
        ]
        if len(selected) != 1:
            fail(f"ServiceMonitor selects {len(selected)} Services, expected one")
        port_names = {port.get("name") for port in selected[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            if endpoint.get("port") not in port_names:
                fail(f"ServiceMonitor port {endpoint.get('port')!r} is not a port of the Service")
            if not str(endpoint.get("path", "/metrics")).startswith("/"):
                fail("ServiceMonitor path must be absolute")
        print(f"ServiceMonitor {monitor['metadata']['name']}: selects Service "
              f"{selected[0]['metadata']['name']}, port(s) {[e['port'] for e in spec['endpoints']]}")

    with open(rules_path, encoding="utf-8") as handle:
        expected_groups = yaml.safe_load(handle)["groups"]
    for rule in rules:
        if rule["apiVersion"] != "monitoring.coreos.com/v1":
            fail(f"PrometheusRule apiVersion {rule['apiVersion']}")
        groups = rule["spec"]["groups"]
        if groups != expected_groups:
            fail(f"PrometheusRule {rule['metadata']['name']} differs from {rules_path}")
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as extracted:
            yaml.safe_dump({"groups": groups}, extracted)
            extracted.flush()
            result = subprocess.run(["promtool", "check", "rules", extracted.name], check=False)
            if result.returncode != 0:
                fail(f"promtool rejects the groups of PrometheusRule {rule['metadata']['name']}")
        print(f"PrometheusRule {rule['metadata']['name']}: same groups as {rules_path}, promtool accepts them")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail(__doc__)
    main(sys.argv[1], sys.argv[2])
