"""Render the promguard Helm chart and check what it produces; run by scripts/check-chart.sh.

Rendering is Helm's own code (Helm v4's Go SDK through helm-python-sdk): `helm lint`,
the values schema and the templates exactly as `helm template` renders them. Every
rendered object is then validated against the Kubernetes OpenAPI schemas (strict: an
unknown field fails), the pieces the chart promises are checked one by one, and the
configuration and policies it renders are handed to promguard's own `check-config` and
`policy check`. The Dockerfile is parsed with Docker's parser.

    python check_chart.py REPO PROMGUARD_BINARY
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import dockerfile
import helm_python as helm
import kubernetes_validate
import yaml

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) that the bundled
# schemas cover, and the newest they know.
KUBE_VERSIONS = ["1.25.0", "1.37.0"]
# Kinds whose schemas come from CRDs (prometheus-operator), checked field by field below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
RELEASE, NAMESPACE = "promguard", "monitoring"

REPO = Path(sys.argv[1]).resolve()
PROMGUARD = Path(sys.argv[2]).resolve()
CHART = REPO / "helm" / "promguard"

# Every optional piece on, and the values a real install would give.
FULL = {
    "replicaCount": 3,
    "autoscaling": {"enabled": False},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "policies": {"files": {"zz-drill.yaml": "windows:\n  - name: drill\n    start: '2026-11-20T10:00:00'\n"
                                            "    end: '2026-11-20T11:00:00'\n    timezone: Europe/Moscow\n"},
                 "rollOnChange": True},
    "auth": {"adminToken": "given-admin-token", "grafanaSecret": "given-grafana-secret"},
    "extraEnv": [{"name": "PROMGUARD_LOG", "value": "debug"}],
    "config": {"warm": {"dashboards": ["/etc/team/on-call.json"]}},
}
SINGLE = {"replicaCount": 1, "autoscaling": {"enabled": False}, "saleModeState": {"persistence": True}}
EXISTING = {"auth": {"existingSecret": "promguard-from-vault"}, "policies": {"bundled": False},
            "warm": {"curatedDashboards": False}}
# A fleet on an external Redis whose URL carries a password, and one on the bundled Redis.
EXTERNAL_REDIS = {"redis": {"url": "rediss://:hunter2@redis.shared.svc:6380/2", "keyPrefix": "shop:"}}
BUNDLED_REDIS = {"redis": {"bundled": {"enabled": True}}, "replicaCount": 3, "autoscaling": {"enabled": False}}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def render(values):
    return render_with_notes(values)[0]


def render_with_notes(values):
    """The rendered objects, and the rendered NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for template, text in manifests.items():
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind, name=None):
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def validate_schemas(objects, scenario):
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{scenario}: {obj['kind']} {obj['metadata']['name']} on {version}: {e.message}")


def secret_value(secret, key):
    if "stringData" in secret and key in secret["stringData"]:
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def check_with_promguard(objects, scenario):
    """promguard itself accepts the rendered config and policies."""
    config_map = one(objects, "ConfigMap", RELEASE)
    config = yaml.safe_load(config_map["data"]["promguard.yaml"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policies = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == f"{RELEASE}-policies"]
        if policies:
            (tmp / "policies").mkdir()
            for name, text in policies[0]["data"].items():
                (tmp / "policies" / name).write_text(text)
            run([PROMGUARD, "policy", "check", tmp / "policies"], scenario)
            check(config["policy"]["dir"] == "/etc/promguard/policies", f"{scenario}: policy.dir")
            config["policy"]["dir"] = str(tmp / "policies")
        else:
            check("dir" not in config["policy"], f"{scenario}: policy.dir without policy files")
        (tmp / "promguard.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, PROMGUARD_GRAFANA_SECRET="from-the-secret",
                   PROMGUARD_REDIS_URL="redis://from-the-secret:6379")
        run([PROMGUARD, "check-config", tmp / "promguard.yaml"], scenario, env)


# What promguard holds beyond its cache and parse memo, measured in the storm bench
# (a full 512 MiB cache peaked at about 630 MiB RSS): answers in flight, connections,
# allocator slack. README "Memory" gives the numbers.
HEADROOM = 128 << 20
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30,
         "K": 10**3, "M": 10**6, "G": 10**9}


def size(text):
    """Bytes in a promguard size (512MiB) or a Kubernetes quantity (768Mi, 1Gi)."""
    text = str(text).strip()
    for unit, factor in sorted(UNITS.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def check_memory(objects, scenario):
    """The pod's memory request and limit cover the cache, the parse memo and the headroom."""
    config = yaml.safe_load(one(objects, "ConfigMap", RELEASE)["data"]["promguard.yaml"])
    cache = size((config.get("cache") or {}).get("max_bytes", "512MiB"))
    memo = size((config.get("query") or {}).get("memo_bytes", "32MiB"))
    need = cache + memo + HEADROOM
    resources = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]["resources"]
    for kind in ("requests", "limits"):
        have = size(resources[kind]["memory"])
        check(have >= need, f"{scenario}: resources.{kind}.memory {resources[kind]['memory']} is below "
                            f"cache.max_bytes + query.memo_bytes + {HEADROOM >> 20}Mi = {need >> 20}Mi")


def run(argv, scenario, env=None):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
    check(done.returncode == 0, f"{scenario}: {' '.join(map(str, argv[1:3]))}: {done.stdout}{done.stderr}")


def check_defaults(objects):
    scenario = "defaults"
    deployment = one(objects, "Deployment", RELEASE)
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    check(container["livenessProbe"]["httpGet"]["path"] == "/-/healthy", "liveness on /-/healthy")
    check(container["readinessProbe"]["httpGet"]["path"] == "/-/ready", "readiness on /-/ready")
    check(container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"],
          "memory requests and limits")
    check(size(container["resources"]["limits"]["memory"]) < 2 * (512 << 20) + 1,
          "the default memory limit is the measured need with a margin, not a guess")
    check(spec["securityContext"]["runAsNonRoot"] is True, "pod runs as non-root")
    security = container["securityContext"]
    check(security["readOnlyRootFilesystem"] is True, "read-only root filesystem")
    check(security["allowPrivilegeEscalation"] is False, "no privilege escalation")
    check(security["capabilities"]["drop"] == ["ALL"], "all capabilities dropped")
    check(spec["automountServiceAccountToken"] is False, "no service account token")
    annotations = pod["metadata"]["annotations"]
    check("checksum/config" in annotations and "checksum/secret" in annotations,
          "config and secret changes roll the pods")
    check("checksum/policies" not in annotations, "policy edits are hot-reloaded, not rolled")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    check("subPath" not in mounts["policies"], "policies mounted as a directory, so updates reach the pod")
    check(mounts["state"]["mountPath"] == "/var/lib/promguard", "writable state directory")
    volumes = {v["name"]: v for v in spec["volumes"]}
    check("emptyDir" in volumes["state"], "sale-mode state on an emptyDir by default")
    env = {e["name"]: e for e in container["env"]}
    for name, key in [("PROMGUARD_ADMIN_TOKEN", "admin-token"), ("PROMGUARD_GRAFANA_SECRET", "grafana-secret")]:
        check(env[name]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": key}, f"{name} from the Secret")
    check("replicas" not in deployment["spec"], "the HPA owns the replica count")

    labels = pod["metadata"]["labels"]
    service = one(objects, "Service")
    check(all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), "the Service selects the pods")
    check(service["spec"]["ports"][0]["targetPort"] == "http", "the Service targets the http port")
    hpa = one(objects, "HorizontalPodAutoscaler")
    check(hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], "the HPA scales the Deployment")
    pdb = one(objects, "PodDisruptionBudget")
    check(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the PDB selects the pods")

    secret = one(objects, "Secret", RELEASE)
    grafana_secret = secret_value(secret, "grafana-secret")
    check(len(secret_value(secret, "admin-token")) >= 32, "a generated admin token")
    check(len(grafana_secret) >= 32, "a generated Grafana secret")

    config = yaml.safe_load(one(objects, "ConfigMap", RELEASE)["data"]["promguard.yaml"])
    check(config["listen"] == "0.0.0.0:9091", "listens on all interfaces in the pod")
    check(config["identity"]["grafana"]["secret"] == {"env": "PROMGUARD_GRAFANA_SECRET"},
          "the Grafana secret comes from the environment, not the ConfigMap")
    check(config["priority"]["dashboards"] == ["orders", "sla", "promguard"], "curated dashboards go first")

    policies = one(objects, "ConfigMap", f"{RELEASE}-policies")["data"]
    for path in sorted((REPO / "policies").glob("*.yaml")):
        check(policies.get(path.name) == path.read_text(), f"policies/{path.name} shipped as is")

    datasource_secret = one(objects, "Secret", f"{RELEASE}-grafana-datasource")
    check(datasource_secret["metadata"]["labels"].get("grafana_datasource") == "1", "data source labelled for the sidecar")
    datasource = yaml.safe_load(datasource_secret["stringData"]["promguard-datasource.yaml"])["datasources"][0]
    check(datasource["uid"] == "promguard" and datasource["type"] == "prometheus", "data source uid promguard")
    check(datasource["url"] == f"http://{RELEASE}.{NAMESPACE}.svc:9091", "data source points at the Service")
    check(datasource["jsonData"]["httpMethod"] == "POST", "data source uses POST")
    check(datasource["jsonData"]["httpHeaderName1"] == "X-Promguard-Grafana-Secret", "data source sends the secret header")
    check(datasource["secureJsonData"]["httpHeaderValue1"] == grafana_secret,
          "data source and promguard share one generated secret")

    dashboards = [o for o in by_kind(objects, "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]
    files = sorted((REPO / "dashboards").glob("*.json"))
    check(len(dashboards) == len(files) == 3, "one ConfigMap per curated dashboard")
    for config_map in dashboards:
        check(config_map["metadata"]["labels"].get("grafana_dashboard") == "1", "dashboards labelled for the sidecar")
        for name, text in config_map["data"].items():
            check(text == (REPO / "dashboards" / name).read_text(), f"dashboards/{name} shipped as is")
            check(json.loads(text)["uid"] == name.removesuffix(".json"), f"{name}: uid matches the file")

    warm = one(objects, "ConfigMap", f"{RELEASE}-warm-dashboards")["data"]
    check(sorted(warm) == [f.name for f in files] and all(warm[f.name] == f.read_text() for f in files),
          "the curated dashboards shipped as is for warming")
    check(config["warm"]["dashboards"] == [f"/etc/promguard/dashboards/{f.name}" for f in files],
          f"warm.dashboards lists them: {config.get('warm')}")
    check(mounts["warm-dashboards"]["mountPath"] == "/etc/promguard/dashboards"
          and "subPath" not in mounts["warm-dashboards"], "warming's dashboards mounted as a directory")
    check(volumes["warm-dashboards"]["configMap"]["name"] == f"{RELEASE}-warm-dashboards",
          "warming's dashboards from their ConfigMap")

    check(not by_kind(objects, "ServiceMonitor") and not by_kind(objects, "PrometheusRule"),
          "CRD objects only on request")


def check_full(objects):
    deployment = one(objects, "Deployment", RELEASE)
    check(deployment["spec"]["replicas"] == 3, "full: replicaCount without autoscaling")
    check(not by_kind(objects, "HorizontalPodAutoscaler"), "full: no HPA when autoscaling is off")
    check("checksum/policies" in deployment["spec"]["template"]["metadata"]["annotations"],
          "full: rollOnChange rolls the pods on policy edits")
    monitor = one(objects, "ServiceMonitor")
    check(monitor["spec"]["endpoints"][0]["port"] == "http" and monitor["spec"]["endpoints"][0]["path"] == "/metrics",
          "full: the ServiceMonitor scrapes /metrics")
    check(monitor["metadata"]["labels"].get("release") == "kube-prometheus-stack", "full: ServiceMonitor labels")
    rule = one(objects, "PrometheusRule")
    groups = [g for path in sorted((REPO / "dashboards" / "rules").glob("*.yml"))
              for g in yaml.safe_load(path.read_text())["groups"]]
    check(rule["spec"]["groups"] == groups, "full: the PrometheusRule carries dashboards/rules/*.yml")
    secret = one(objects, "Secret", RELEASE)
    check(secret_value(secret, "admin-token") == "given-admin-token", "full: a given admin token is used")
    policies = one(objects, "ConfigMap", f"{RELEASE}-policies")["data"]
    check("zz-drill.yaml" in policies and "november.yaml" in policies, "full: bundled and extra policy files")
    config = yaml.safe_load(one(objects, "ConfigMap", RELEASE)["data"]["promguard.yaml"])
    check(config["warm"]["dashboards"][0] == "/etc/team/on-call.json" and len(config["warm"]["dashboards"]) == 4,
          f"full: the curated dashboards are added to warm.dashboards given: {config['warm']}")


def check_single(objects):
    deployment = one(objects, "Deployment", RELEASE)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = one(objects, "PersistentVolumeClaim")
    check(volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"],
          "single: the sale-mode state on a PersistentVolumeClaim")
    check(deployment["spec"]["strategy"]["type"] == "Recreate", "single: one pod holds the volume at a time")


def check_existing_secret(objects):
    check(not [o for o in by_kind(objects, "Secret") if o["metadata"]["name"] == RELEASE],
          "existing secret: the chart creates none")
    container = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    check(refs == {"promguard-from-vault"}, "existing secret: the pod reads it")
    datasource = yaml.safe_load(one(objects, "Secret", f"{RELEASE}-grafana-datasource")
                                ["stringData"]["promguard-datasource.yaml"])["datasources"][0]
    check(datasource["secureJsonData"]["httpHeaderValue1"] == "$PROMGUARD_GRAFANA_SECRET",
          "existing secret: Grafana takes the secret from its environment")
    check(not [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == f"{RELEASE}-policies"],
          "no policy files: no policies ConfigMap")
    config = yaml.safe_load(one(objects, "ConfigMap", RELEASE)["data"]["promguard.yaml"])
    mounts = {m["name"] for m in one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]
              ["volumeMounts"]}
    check("warm" not in config and "warm-dashboards" not in mounts
          and not [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-warm-dashboards")],
          "warm.curatedDashboards false: nothing mounted or listed for warming")


def env_of(objects):
    container = one(objects, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def shared_of(objects):
    config = yaml.safe_load(one(objects, "ConfigMap", RELEASE)["data"]["promguard.yaml"])
    return config.get("shared")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_no_redis(objects, notes, scenario):
    check(shared_of(objects) is None, f"{scenario}: no shared state without redis")
    check("PROMGUARD_REDIS_URL" not in env_of(objects), f"{scenario}: no Redis URL without redis")
    check("for pod in" in notes, f"{scenario}: NOTES say to switch every pod without redis")


def check_external_redis(objects, notes):
    scenario = "external redis"
    shared = shared_of(objects)
    check(shared and shared["redis"] == {"url": {"env": "PROMGUARD_REDIS_URL"}, "key_prefix": "shop:"},
          f"{scenario}: the config reads the URL from the environment, with the prefix: {shared}")
    check(shared and shared["expected_replicas"] == 2, f"{scenario}: expected_replicas is autoscaling's minimum")
    secret = one(objects, "Secret", f"{RELEASE}-redis")
    check(secret_value(secret, "redis-url") == EXTERNAL_REDIS["redis"]["url"], f"{scenario}: the URL is in a Secret")
    check(EXTERNAL_REDIS["redis"]["url"] not in json.dumps(by_kind(objects, "ConfigMap")),
          f"{scenario}: the URL (and its password) stays out of the ConfigMaps")
    ref = env_of(objects)["PROMGUARD_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    check(ref == {"name": f"{RELEASE}-redis", "key": "redis-url"}, f"{scenario}: the pod reads the URL from it")
    check(not [o for o in by_kind(objects, "Deployment") if o["metadata"]["name"] != RELEASE],
          f"{scenario}: no bundled Redis")
    check("for pod in" not in notes and f"exec deploy/{RELEASE} --" in notes,
          f"{scenario}: NOTES switch the fleet through any pod, no loop over pods")


def check_bundled_redis(objects, notes):
    scenario = "bundled redis"
    shared = shared_of(objects)
    check(shared and shared["expected_replicas"] == 3, f"{scenario}: expected_replicas is replicaCount")
    check(env_of(objects)["PROMGUARD_REDIS_URL"].get("value") == f"redis://{RELEASE}-redis:6379",
          f"{scenario}: the pods reach the bundled Redis' Service")
    redis = one(objects, "Deployment", f"{RELEASE}-redis")
    service = one(objects, "Service", f"{RELEASE}-redis")
    redis_pod = redis["spec"]["template"]["metadata"]["labels"]
    promguard_pod = one(objects, "Deployment", RELEASE)["spec"]["template"]["metadata"]["labels"]
    check(matches(service["spec"]["selector"], redis_pod), f"{scenario}: the Redis Service selects Redis")
    check(not matches(service["spec"]["selector"], promguard_pod), f"{scenario}: ... and not promguard")
    for obj in (one(objects, "Service", RELEASE), one(objects, "Deployment", RELEASE),
                one(objects, "PodDisruptionBudget")):
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        check(not matches(selector, redis_pod), f"{scenario}: {obj['kind']} {RELEASE} does not select Redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    check(args[args.index("--save") + 1] == "" and "allkeys-lru" in args,
          f"{scenario}: Redis keeps nothing on disk and evicts the least recently used")
    check(f"exec deploy/{RELEASE} --" in notes and f"{RELEASE}-redis" in notes, f"{scenario}: NOTES")


def check_refusals():
    """Values the chart must refuse rather than render into something broken."""
    for values, why in [
        ({"saleModeState": {"persistence": True}}, "a ReadWriteOnce state volume with several replicas"),
        ({"serviceMonitor": {"enable": True}}, "a misspelt key"),
        ({"replicaCount": "two"}, "a wrong type"),
        ({"redis": {"url": "redis://r:6379", "bundled": {"enabled": True}}}, "an external and a bundled Redis"),
        ({"redis": {"url": "http://r:6379"}}, "a Redis URL that is not redis:// or rediss://"),
    ]:
        try:
            render(values)
            failures.append(f"rendered despite {why}")
        except (helm.HelmValuesError, helm.HelmRenderError):
            pass


def check_dockerfile():
    commands = dockerfile.parse_file(str(REPO / "Dockerfile"))
    stages = [c for c in commands if c.cmd == "FROM"]
    check(len(stages) >= 2, "Dockerfile: multi-stage")
    final = commands[commands.index(stages[-1]):]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    check(users and users[-1].split(":")[0] not in ("0", "root"), "Dockerfile: the image runs as non-root")
    check(any("--locked" in " ".join(c.value) for c in commands if c.cmd == "RUN"), "Dockerfile: builds --locked")
    check(any(c.cmd == "EXPOSE" and c.value[0] == "9091" for c in final), "Dockerfile: exposes 9091")


def main():
    lint = helm.lint(CHART, strict=True)
    for message in lint["messages"]:
        check(message["severity"] < 2, f"helm lint: {message['path']}: {message['error']}")
    # (scenario, values, its own checks, whether it configures Redis)
    scenarios = [("defaults", {}, check_defaults, False), ("full", FULL, check_full, False),
                 ("single", SINGLE, check_single, False),
                 ("existing secret", EXISTING, check_existing_secret, False),
                 ("external redis", EXTERNAL_REDIS, check_external_redis, True),
                 ("bundled redis", BUNDLED_REDIS, check_bundled_redis, True)]
    for scenario, values, specific, redis in scenarios:
        objects, notes = render_with_notes(values)
        validate_schemas(objects, scenario)
        check_with_promguard(objects, scenario)
        check_memory(objects, scenario)
        if redis:
            specific(objects, notes)
        else:
            specific(objects)
            check_no_redis(objects, notes, scenario)
        print(f"check-chart: {scenario}: rendered and checked {len(objects)} objects")
    check_refusals()
    check_dockerfile()
    for failure in failures:
        print(f"check-chart: FAILED: {failure}", file=sys.stderr)
    print(f"check-chart: {'FAILED' if failures else 'ok'} ({len(failures)} failures)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
