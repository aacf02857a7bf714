"""The Helm chart (charts/neoplasma-operator), the examples and the Dockerfile, without a cluster.

`helm lint --strict` and `helm template` run on the chart with its defaults and with other
values; every rendered object is checked against Kubernetes' JSON schemas (kubernetes-validate,
strict: unknown fields refused); values.schema.json refuses values of the wrong type; the
chart's CRD is the repository's; the RBAC rules grant exactly what the operator's code calls.

Needs helm: on PATH, in $NEOPLASMA_HELM, or where scripts/k8s-control-plane.sh installs it.
Without it the helm tests are skipped (reason printed at the end of the run), or fail when CI is set.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from neoplasma.cli import build_parser
from neoplasma.core.scaling import parse_policy
from neoplasma.operator.spec import parse_cluster

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "neoplasma-operator"
CRD = REPO / "crds" / "neoplasmaclusters.yaml"
OPERATOR_SOURCES = REPO / "operator" / "neoplasma" / "operator"
EXAMPLES = REPO / "examples"
KUBE_VERSION = "1.25"  # the oldest schemas kubernetes-validate bundles (the chart needs 1.20+)
RELEASE = "neo"
NAMESPACE = "neoplasma-system"


# -- helm -------------------------------------------------------------------------------------


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/neoplasma-helm-cache",
                               "HELM_CONFIG_HOME": "/tmp/neoplasma-helm-config"})


# Values other than the defaults: each key of values.yaml changed at least once across these.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "restricted, metrics": {
        "watchNamespaces": ["events", "staging"],
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "service": {"annotations": {"prometheus.io/scrape": "true"}}},
        "logLevel": "debug",
    },
    "everything else": {
        "image": {"repository": "registry.example/neo", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "nameOverride": "np",
        "fullnameOverride": "events-operator",
        "serviceAccount": {"create": False, "name": "existing", "annotations": {"a": "b"}},
        "podAnnotations": {"example.com/a": "1"},
        "podLabels": {"team": "events"},
        "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "events", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "watchNamespaces": ["events"],
        "healthPort": 9000,
        "livenessProbe": {"initialDelaySeconds": 0, "periodSeconds": 5, "timeoutSeconds": 2,
                          "failureThreshold": 6},
        "metrics": {"enabled": True, "port": 9400, "service": {"type": "NodePort", "port": 9100}},
        "tests": {"enabled": False},
    },
}


def values_file(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def template(helm: str, tmp_path: Path, values: dict[str, Any], *extra: str) -> list[dict[str, Any]]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                      "--values", values_file(tmp_path, values), *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d for d in docs}


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and "helm.sh/hook" not in d["metadata"].get("annotations", {})]
    return found


@pytest.fixture(scope="module")
def rendered(helm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return {name: template(helm, tmp_path_factory.mktemp("values"), values)
            for name, values in VALUE_SETS.items()}


# -- lint and schema validation ---------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(helm: str, tmp_path: Path, values: dict[str, Any]) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), "--values", values_file(tmp_path, values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_valid_for_kubernetes(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # no bundled schema; checked in test_service_monitor
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_crds_are_rendered_valid_and_the_repositorys(helm: str, tmp_path: Path) -> None:
    docs = template(helm, tmp_path, {}, "--include-crds")
    [crd] = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    assert crd == yaml.safe_load(CRD.read_text())


def test_chart_crd_is_a_byte_identical_copy() -> None:
    copies = sorted((CHART / "crds").iterdir())
    assert [p.name for p in copies] == [CRD.name]
    assert copies[0].read_bytes() == CRD.read_bytes(), (
        f"charts/neoplasma-operator/crds/{CRD.name} differs from crds/{CRD.name}: "
        f"cp crds/{CRD.name} charts/neoplasma-operator/crds/"
    )


BAD_VALUES = {
    "watchNamespaces not a list": ('watchNamespaces="events"', "watchNamespaces: Invalid type. Expected: array"),
    "namespace not a DNS label": ('watchNamespaces=["Events_1"]', "watchNamespaces.0: Does not match pattern"),
    "image.tag a number": ("image.tag=1.2", "image.tag: Invalid type. Expected: string, given: number"),
    "pullPolicy unknown": ('image.pullPolicy="Sometimes"', "image.pullPolicy: image.pullPolicy must be one of"),
    "healthPort a string": ('healthPort="8080"', "healthPort: Invalid type. Expected: integer, given: string"),
    "healthPort out of range": ("healthPort=70000", "healthPort: Must be less than or equal to 65535"),
    "metrics.enabled a string": ('metrics.enabled="yes"', "metrics.enabled: Invalid type. Expected: boolean"),
    "logLevel unknown": ('logLevel="loud"', "logLevel: logLevel must be one of the following"),
    "resources not a quantity": ('resources={"limits": {"memory": "lots"}}', "resources.limits.memory"),
    "tolerations an object": ('tolerations={"key": "x"}', "tolerations: Invalid type. Expected: array"),
    "misspelt key": ("watchNamespace=[]", "Additional property watchNamespace is not allowed"),
    "serviceAccount.create a string": ('serviceAccount.create="false"', "serviceAccount.create: Invalid type"),
}


@pytest.mark.parametrize(("value", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("command", ["lint", "template"])
def test_values_schema_refuses_wrong_values(helm: str, command: str, value: str, message: str) -> None:
    args = ["lint", "--strict"] if command == "lint" else ["template", RELEASE]
    result = run_helm(helm, *args, str(CHART), "--set-json", value)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "values don't meet the specifications of the schema" in output
    assert message in output, output


def test_service_monitor_needs_metrics(helm: str, tmp_path: Path) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", "metrics.serviceMonitor.enabled=true")
    assert result.returncode != 0
    assert "metrics.serviceMonitor.enabled needs metrics.enabled" in result.stderr


def test_values_schema_describes_every_default() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)
    assert set(schema["properties"]) - {"global"} == set(values)


def test_every_value_has_a_comment() -> None:
    """Each key in values.yaml has a comment on the line(s) just above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w.-]*:", line):
            above = lines[number - 1].strip() if number else ""
            if not above.startswith("#"):
                uncommented.append(f"line {number + 1}: {line.strip()}")
    assert not uncommented, "values.yaml keys without a comment:\n" + "\n".join(uncommented)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert (chart["name"], chart["version"], chart["appVersion"]) == ("neoplasma-operator", "0.1.0", "0.1.0")
    assert chart["kubeVersion"] == ">=1.20.0-0"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject, "appVersion is the distribution's version"


# -- what is rendered -------------------------------------------------------------------------


def test_default_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = sorted((kind, name) for kind, _, name in by_kind(rendered["defaults"]))
    fullname = f"{RELEASE}-neoplasma-operator"
    assert names == sorted([
        ("ClusterRole", f"{fullname}-cluster"), ("ClusterRoleBinding", f"{fullname}-cluster"),
        ("ClusterRole", fullname), ("ClusterRoleBinding", fullname),
        ("Deployment", fullname), ("ServiceAccount", fullname), ("Pod", f"{fullname}-test"),
    ])
    for doc in rendered["defaults"]:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = only(rendered["defaults"], "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "kopf must never run twice on the same objects"
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-neoplasma-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = container_of(deployment)
    assert container["image"] == "ghcr.io/neoplasma/neoplasma:0.1.0"
    assert "command" not in container, "the image's entry point (neoplasma) runs"
    assert container["args"] == ["operator", "--liveness-port", "8080"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    env = env_of(container)
    assert env["NEOPLASMA_DEFAULT_IMAGE"] == container["image"]
    assert env["NEOPLASMA_LOG_LEVEL"] == "info"


def test_operator_deployment_with_other_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = only(rendered["everything else"], "Deployment")
    assert deployment["metadata"]["name"] == "events-operator"
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    values = VALUE_SETS["everything else"]
    assert container["image"] == "registry.example/neo:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert env_of(container)["NEOPLASMA_DEFAULT_IMAGE"] == "registry.example/neo:1.2.3"
    assert container["args"] == ["operator", "--liveness-port", "9000", "--metrics-port", "9400",
                                 "--namespace", "events"]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", 9000), ("metrics", 9400)]
    assert container["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": "http"}, **values["livenessProbe"]}
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "200Mi"},
                                      "limits": {"cpu": 1, "memory": "1Gi"}}
    assert pod["serviceAccountName"] == "existing"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == values[key]
    template_meta = deployment["spec"]["template"]["metadata"]
    assert template_meta["annotations"] == {"example.com/a": "1"}
    assert template_meta["labels"]["team"] == "events"
    assert template_meta["labels"]["app.kubernetes.io/name"] == "np"
    kinds = {kind for kind, _, _ in by_kind(rendered["everything else"])}
    assert "ServiceAccount" not in kinds and "Pod" not in kinds


def test_watched_namespaces_become_arguments(rendered: dict[str, list[dict[str, Any]]]) -> None:
    container = container_of(only(rendered["restricted, metrics"], "Deployment"))
    assert container["args"] == ["operator", "--liveness-port", "8080", "--metrics-port", "9090",
                                 "--namespace", "events", "--namespace", "staging"]
    assert env_of(container)["NEOPLASMA_LOG_LEVEL"] == "debug"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_cli_accepts_the_rendered_arguments(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    """The container's args are a valid `neoplasma` command line (the image's entry point), and
    every `--option value` the chart renders is the value the command runs with."""
    args = container_of(only(rendered[name], "Deployment"))["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "operator"
    for flag, value in itertools.pairwise(args):
        if flag.startswith("--") and flag != "--namespace" and not value.startswith("--"):
            assert str(getattr(parsed, flag[2:].replace("-", "_"))) == value, flag
    assert parsed.namespaces == [a for i, a in enumerate(args) if i and args[i - 1] == "--namespace"]


def test_selectors_match_only_the_operator_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        deployment = only(docs, "Deployment")
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        for doc in docs:
            if doc["kind"] == "Service":
                assert doc["spec"]["selector"] == selector
            if doc["kind"] == "Pod":  # the helm test pod
                assert not selector.items() <= doc["metadata"]["labels"].items()


def test_service_monitor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["restricted, metrics"]
    service = only(docs, "Service")
    monitor = only(docs, "ServiceMonitor")
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 9090, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    ports = container_of(only(docs, "Deployment"))["ports"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in ports
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics", "interval": "30s",
                                             "scrapeTimeout": "10s"}]
    assert not [d for d in rendered["defaults"] if d["kind"] in ("Service", "ServiceMonitor")]
    other = only(rendered["everything else"], "Service")
    assert (other["spec"]["type"], other["spec"]["ports"][0]["port"]) == ("NodePort", 9100)
    assert not [d for d in rendered["everything else"] if d["kind"] == "ServiceMonitor"]


def test_helm_test_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    [pod] = [d for d in rendered["restricted, metrics"] if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-neoplasma-operator"
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["python", "-c"]
    script, namespaces = container["args"]
    compile(script, "helm-test", "exec")
    assert "neoplasmaclusters.neoplasma.io" in script
    assert json.loads(namespaces) == ["events", "staging"]
    [default_pod] = [d for d in rendered["defaults"] if d["kind"] == "Pod"]
    assert default_pod["spec"]["containers"][0]["args"][1:] == ["[]"]


# -- RBAC ---------------------------------------------------------------------------------------

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


def rule_set(rules: list[dict[str, Any]]) -> set[Rule]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.fixture(scope="module")
def chart_rules() -> dict[str, list[dict[str, Any]]]:
    rules: dict[str, list[dict[str, Any]]] = yaml.safe_load((CHART / "rbac" / "rules.yaml").read_text())
    return rules


def test_rules_have_no_wildcards_or_duplicates(chart_rules: dict[str, list[dict[str, Any]]]) -> None:
    assert set(chart_rules) == {"namespaced", "cluster"}
    for scope, rules in chart_rules.items():
        for rule in rules:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key] and rule[key], f"{scope}: {rule}"
        expanded = [(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]]
        assert len(expanded) == len(set(expanded)), f"{scope}: a permission is granted twice"


def rbac_objects(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    kinds = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    return {key: doc for key, doc in by_kind(docs).items() if key[0] in kinds}


def test_all_namespaces_rbac(rendered: dict[str, list[dict[str, Any]]],
                             chart_rules: dict[str, list[dict[str, Any]]]) -> None:
    objects = rbac_objects(rendered["defaults"])
    fullname = f"{RELEASE}-neoplasma-operator"
    assert set(objects) == {("ClusterRole", "", fullname), ("ClusterRoleBinding", "", fullname),
                            ("ClusterRole", "", f"{fullname}-cluster"),
                            ("ClusterRoleBinding", "", f"{fullname}-cluster")}
    assert objects["ClusterRole", "", fullname]["rules"] == chart_rules["namespaced"]
    assert objects["ClusterRole", "", f"{fullname}-cluster"]["rules"] == chart_rules["cluster"]
    for name in (fullname, f"{fullname}-cluster"):
        binding = objects["ClusterRoleBinding", "", name]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": NAMESPACE}]


@pytest.mark.parametrize("name", ["restricted, metrics", "everything else"])
def test_restricted_rbac_is_one_role_per_namespace(rendered: dict[str, list[dict[str, Any]]],
                                                   chart_rules: dict[str, list[dict[str, Any]]], name: str) -> None:
    values = VALUE_SETS[name]
    fullname = values.get("fullnameOverride", f"{RELEASE}-neoplasma-operator")
    account = values.get("serviceAccount", {}).get("name") or fullname
    objects = rbac_objects(rendered[name])
    expected = {("ClusterRole", "", f"{fullname}-cluster"), ("ClusterRoleBinding", "", f"{fullname}-cluster")}
    for namespace in values["watchNamespaces"]:
        expected |= {("Role", namespace, fullname), ("RoleBinding", namespace, fullname)}
    assert set(objects) == expected
    assert objects["ClusterRole", "", f"{fullname}-cluster"]["rules"] == chart_rules["cluster"]
    for namespace in values["watchNamespaces"]:
        assert objects["Role", namespace, fullname]["rules"] == chart_rules["namespaced"]
        binding = objects["RoleBinding", namespace, fullname]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": fullname}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


# What the operator does through kopf, whatever its handlers: list and watch what it handles or
# indexes, patch what it handles with state (finalizers, handler progress), post Events. And
# the cluster-scoped reads of kopf's resource and namespace observers.
KOPF_EVENTS: set[Rule] = {("", "events", "create")}
KOPF_CLUSTER: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}
# The helm test pod reads the CRD with the operator's ServiceAccount.
HELM_TEST_CLUSTER: set[Rule] = {("apiextensions.k8s.io", "customresourcedefinitions", "get")}
# kubernetes client methods -> (apiGroup, resource); verbs from the method's prefix.
CLIENT_RESOURCES: dict[str, tuple[str, str]] = {
    "deployment": ("apps", "deployments"),
    "deployment_scale": ("apps", "deployments/scale"),
    "deployment_status": ("apps", "deployments/status"),
    "service": ("", "services"),
    "pod": ("", "pods"),
    "pod_status": ("", "pods/status"),
    "event": ("", "events"),
    "pod_disruption_budget": ("policy", "poddisruptionbudgets"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
    "secret": ("", "secrets"),
    "custom_object_status": ("", "/status"),  # the group and plural come from the call's arguments
    "custom_object": ("", ""),
}
CLIENT_VERBS = {"create": "create", "patch": "patch", "replace": "update", "delete": "delete",
                "read": "get", "list": "list", "watch": "watch", "delete_collection": "deletecollection"}
# Where a custom-object call's plural stands for a known group.
PLURAL_GROUPS = {"poddisruptionbudgets": "policy", "neoplasmaclusters": "neoplasma.io"}
# A kubernetes client method: VERB_[namespaced_|cluster_]KIND[_for_all_namespaces]. Calls with
# namespaced_/for_all_namespaces are counted whatever object they are made on; the others (e.g.
# list_namespace) only on an API object (self.core, apps_api, CoreV1Api(...), ...).
CLIENT_CALL = re.compile(r"(create|patch|replace|delete_collection|delete|read|list|watch)_"
                         r"(namespaced_|cluster_)?(\w+?)(_for_all_namespaces)?")
API_OWNER = re.compile(r"(^|\.)(core|apps|custom|policy|rbac|\w*api\w*(\(.*\))?)$", re.IGNORECASE)
KOPF_STATEFUL = {"create", "update", "delete", "resume", "field", "timer", "daemon"}
KOPF_WATCHING = KOPF_STATEFUL | {"event", "index"}


def _string_constants(trees: list[ast.Module]) -> dict[str, str]:
    constants: dict[str, str] = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value.value
    return constants


def _strings(node: ast.AST, constants: dict[str, str]) -> list[str]:
    """The string values an expression can stand for (literals, module constants, tuples)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return [constants[name]] if name in constants else []
    if isinstance(node, ast.Tuple | ast.List):
        return [s for element in node.elts for s in _strings(element, constants)]
    return []


def _kopf_resource(call: ast.Call, constants: dict[str, str]) -> tuple[str, str] | None:
    """(group, plural) of a kopf decorator: kopf.on.create("neoplasma.io", "v1alpha1", "x"),
    kopf.index("pods"), or with group=/plural= keywords."""
    positional = [s for arg in call.args for s in _strings(arg, constants)]
    keywords = {k.arg: (_strings(k.value, constants) or [""])[0] for k in call.keywords if k.arg}
    plural = keywords.get("plural") or (positional[-1] if positional else "")
    group = keywords.get("group") or (positional[0] if len(positional) == 3 else "")
    if "." not in group and len(positional) == 2:  # ("apps", "deployments") or ("v1", "pods")
        group = positional[0] if positional[0] != "v1" else ""
    if group.count("/") == 1:  # "apps/v1"
        group = group.split("/")[0]
    group = {"v1": ""}.get(group, group)
    if not plural:
        return None
    return (PLURAL_GROUPS.get(plural, group if plural not in CORE else ""), plural)


CORE = {"pods", "services", "events", "configmaps", "secrets", "endpoints", "namespaces"}


def operator_access() -> tuple[set[Rule], list[str]]:
    """The API access the operator's code makes: (permissions, where each was found)."""
    sources = sorted(OPERATOR_SOURCES.rglob("*.py"))
    trees = [ast.parse(path.read_text(), str(path)) for path in sources]
    constants = _string_constants(trees)
    access: set[Rule] = set()
    found: list[str] = []
    for path, tree in zip(sources, trees, strict=True):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            where = f"{path.relative_to(OPERATOR_SOURCES)}:{node.lineno} {name}"
            owner = ast.unparse(node.func.value)
            if owner in {"kopf.on", "kopf"} and name in KOPF_WATCHING:
                resource = _kopf_resource(node, constants)
                if resource is None:
                    continue
                group, plural = resource
                verbs = {"list", "watch"} | ({"patch"} if name in KOPF_STATEFUL else set())
                access |= {(group, plural, verb) for verb in verbs}
                found.append(f"{where} -> {group or 'core'}/{plural} {sorted(verbs)}")
                continue
            match = CLIENT_CALL.fullmatch(name)
            if match is None or not (match.group(2) or match.group(4) or API_OWNER.search(owner)):
                continue  # not a kubernetes client call (e.g. loop.create_task, self.kube.patch_status)
            verb, kind = CLIENT_VERBS[match.group(1)], match.group(3)
            if kind not in CLIENT_RESOURCES:
                raise AssertionError(f"{where}: the chart test does not know kind {kind!r}: add it to "
                                     "CLIENT_RESOURCES and the permission to rbac/rules.yaml")
            api_group, api_resource = CLIENT_RESOURCES[kind]
            if kind.startswith("custom_object"):
                plurals = [s for arg in node.args for s in _strings(arg, constants) if s in PLURAL_GROUPS]
                assert plurals, f"{where}: cannot tell which custom resource this call reaches"
                api_group, api_resource = PLURAL_GROUPS[plurals[0]], plurals[0] + api_resource
            access.add((api_group, api_resource, verb))
            found.append(f"{where} -> {api_group or 'core'}/{api_resource} {verb}")
    return access, found


def test_operator_code_is_scanned() -> None:
    """The scan below finds at least what the operator is known to do."""
    access, found = operator_access()
    print("\n".join(found))
    assert ("neoplasma.io", "neoplasmaclusters/status", "patch") in access
    assert ("apps", "deployments", "patch") in access


def test_rbac_rules_are_what_the_operator_calls(chart_rules: dict[str, list[dict[str, Any]]]) -> None:
    access, found = operator_access()
    assert any("neoplasmaclusters" in line and "watch" in line for line in found), (
        "the scan found no kopf handler watching NeoplasmaClusters: it no longer sees the operator's code\n"
        + "\n".join(found))
    namespaced = rule_set(chart_rules["namespaced"])
    cluster = rule_set(chart_rules["cluster"])
    needed = access | KOPF_EVENTS
    # Server-side apply creates missing children with a PATCH; the API server authorizes
    # create for that, so every applied kind needs create too.
    needed |= {(g, r, "create") for g, r, v in access if v == "patch" and r in APPLIED}
    assert namespaced == needed, (
        f"rbac/rules.yaml namespaced rules differ from what the operator calls:\n"
        f"  granted, never used: {sorted(namespaced - needed)}\n"
        f"  used, not granted:   {sorted(needed - namespaced)}\n" + "\n".join(found)
    )
    assert cluster == KOPF_CLUSTER | HELM_TEST_CLUSTER


APPLIED = {"deployments", "services", "poddisruptionbudgets", "networkpolicies"}


# -- examples -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    [version] = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", examples(), ids=lambda p: p.name)
def test_examples_are_valid_neoplasma_clusters(path: Path, crd_schema: dict[str, Any]) -> None:
    [resource] = list(yaml.safe_load_all(path.read_text()))
    assert (resource["apiVersion"], resource["kind"]) == ("neoplasma.io/v1alpha1", "NeoplasmaCluster")
    assert "namespace" not in resource["metadata"], "examples go where `kubectl apply -n` says"
    jsonschema.Draft4Validator(crd_schema).validate(resource)
    parse_cluster(resource)


def test_there_are_small_and_production_examples() -> None:
    assert {p.name for p in examples()} >= {"small.yaml", "production.yaml"}


def test_production_example_autoscales() -> None:
    resource = yaml.safe_load((EXAMPLES / "production.yaml").read_text())
    annotations = resource["metadata"]["annotations"]
    assert annotations["neoplasma.io/autoscale"] == "true"
    assert annotations["neoplasma.io/scale-down-delay"] == "300s"
    bounds = {key: int(annotations[f"neoplasma.io/{key}"]) for key in (
        "target-connections-per-broker", "min-brokers", "max-brokers",
        "target-subscribers-per-proxy", "min-proxies", "max-proxies")}
    assert 0 < bounds["min-brokers"] <= resource["spec"]["brokers"]["replicas"] <= bounds["max-brokers"]
    assert 0 < bounds["min-proxies"] <= resource["spec"]["proxies"]["replicas"] <= bounds["max-proxies"]
    assert bounds["target-connections-per-broker"] > 0 and bounds["target-subscribers-per-proxy"] > 0
    policy, errors = parse_policy(annotations, resource["spec"]["brokers"]["replicas"],
                                  resource["spec"]["proxies"]["replicas"])
    assert not errors and policy is not None
    assert policy.autoscale and policy.scale_down_delay == 300
    assert (policy.brokers.minimum, policy.brokers.maximum) == (bounds["min-brokers"], bounds["max-brokers"])
    assert (policy.proxies.minimum, policy.proxies.maximum) == (bounds["min-proxies"], bounds["max-proxies"])


def test_small_example_node_ports_are_mapped_by_the_kind_config() -> None:
    resource = yaml.safe_load((EXAMPLES / "small.yaml").read_text())
    node_ports = set(resource["spec"]["proxies"]["service"]["nodePorts"].values())
    config = yaml.safe_load((REPO / "e2e" / "kind-config.yaml").read_text())
    mapped = {m["containerPort"] for node in config["nodes"] for m in node.get("extraPortMappings", [])}
    assert node_ports == mapped


def test_notes_tell_what_to_apply_next() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "kubectl apply" in notes and "-f examples/small.yaml" in notes


# -- the image ------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages: list[list[str]] = [[]]
    for instruction in instructions:
        if instruction.upper().startswith("FROM ") and stages[-1] and any(
                i.upper().startswith("FROM ") for i in stages[-1]):
            stages.append([])
        stages[-1].append(instruction)
    return stages


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    prelude = [i for i in stages[0] if i.upper().startswith("ARG ")]
    assert prelude == ["ARG PYTHON_IMAGE=python:3.11-slim-bookworm"], "a pinned base, by tag"
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    copies = [i for i in final if i.upper().startswith("COPY ")]
    assert copies == ["COPY --from=builder /opt/neoplasma /opt/neoplasma"], "only the virtualenv"
    assert not [i for i in final if re.search(r"pip install|apt-get|gcc|build-essential", i)]
    assert "USER 10001:10001" in final
    assert final[-2:] == ['ENTRYPOINT ["neoplasma"]', 'CMD ["--help"]']


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = [part.rstrip("/") for i in dockerfile_stages()[0] if i.startswith("COPY ") and "--from" not in i
              for part in i.split()[1:-1]]
    assert {"core", "ingest", "local", "broker", "proxy", "operator", "protos", "pyproject.toml"} <= set(copied)
    for source in copied:
        assert source.rstrip("*") not in ignored, f".dockerignore drops {source}, which the build copies"
    assert {".git", "tests", "charts", "e2e"} <= set(ignored)


def test_image_user_is_the_one_the_charts_and_operator_expect(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = only(rendered["defaults"], "Deployment")["spec"]["template"]["spec"]
    templates = (OPERATOR_SOURCES / "templates" / "deployment.yaml.j2").read_text()
    assert pod["securityContext"]["runAsUser"] == 10001
    assert "runAsUser: 10001" in templates
