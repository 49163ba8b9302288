"""Structural checks of deploy/ that no schema validator covers.

Run by `cargo xtask deploy-check` (xtask/src/deploy_check.rs) with the
Python of its venv (PyYAML comes with kubernetes-validate), as
`python deploy_check.py REPO_ROOT [QUERIES]` (written into the venv). With
QUERIES, the dashboard's queries are written there as a rules file for
`promtool check rules` to parse. The core Kubernetes objects are checked
against the Kubernetes schemas separately (kubernetes-validate); this checks
what ties the objects together and the custom resources (PodMonitor,
PrometheusRule), whose schemas are not bundled, plus the Grafana JSON's
shape. Every problem is printed; the exit status is 1 if there was one.
"""
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(sys.argv[1])
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
NAMESPACE = "stormguard"
problems = []


def problem(msg):
    problems.append(msg)


def load_objects():
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            kind = doc.get("kind")
            if kind in objs:
                problem(f"{path.name}: a second {kind}")
            objs[kind] = (path.name, doc)
    return objs


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def unit_capabilities():
    unit = (ROOT / "packaging/stormguard.service").read_text()
    caps = set()
    for line in unit.splitlines():
        if line.strip().startswith("CapabilityBoundingSet="):
            caps |= set(line.split("=", 1)[1].split())
    return {c.removeprefix("CAP_") for c in caps}


objs = load_objects()
for kind in ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service",
             "PodMonitor", "PrometheusRule"]:
    if kind not in objs:
        problem(f"deploy/kubernetes has no {kind}")
if problems:
    print("\n".join(problems))
    sys.exit(1)

# Every object but the Namespace is in it.
if objs["Namespace"][1]["metadata"]["name"] != NAMESPACE:
    problem(f"the Namespace is not {NAMESPACE}")
for kind, (name, doc) in objs.items():
    if kind != "Namespace" and doc["metadata"].get("namespace") != NAMESPACE:
        problem(f"{name}: {kind} is not in namespace {NAMESPACE}")

# kustomization.yaml lists every manifest.
kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
listed = set(kust.get("resources", []))
files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
if listed != files:
    problem(f"kustomization.yaml resources {sorted(listed)} != manifests {sorted(files)}")

# DaemonSet: what the pod needs, and nothing of what it must not have.
ds_file, ds = objs["DaemonSet"]
pod = ds["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
spec = pod["spec"]
if not subset(ds["spec"]["selector"]["matchLabels"], pod_labels):
    problem(f"{ds_file}: selector does not match the pod template's labels")
if spec.get("hostPID") is not True:
    problem(f"{ds_file}: hostPID must be true (host PIDs in /proc)")
if spec.get("serviceAccountName") != objs["ServiceAccount"][1]["metadata"]["name"]:
    problem(f"{ds_file}: serviceAccountName is not the ServiceAccount's name")
if not any(t.get("operator") == "Exists" and "key" not in t for t in spec.get("tolerations", [])):
    problem(f"{ds_file}: no toleration of every taint (operator: Exists)")
containers = spec["containers"]
if len(containers) != 1:
    problem(f"{ds_file}: expected one container")
c = containers[0]
sc = c.get("securityContext", {})
if sc.get("privileged") is not False:
    problem(f"{ds_file}: privileged must be false")
caps = sc.get("capabilities", {})
if caps.get("drop") != ["ALL"]:
    problem(f"{ds_file}: capabilities.drop must be [ALL]")
want = unit_capabilities()
if set(caps.get("add", [])) != want or len(caps.get("add", [])) != len(want):
    problem(f"{ds_file}: capabilities.add {caps.get('add')} != the unit's {sorted(want)}")
if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
    problem(f"{ds_file}: resource requests and limits are required")
ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
if "metrics" not in ports:
    problem(f"{ds_file}: no container port named metrics")
for probe in ["readinessProbe", "livenessProbe"]:
    port = c.get(probe, {}).get("httpGet", {}).get("port")
    if port not in ports and port not in ports.values():
        problem(f"{ds_file}: {probe} is not on a container port ({port!r})")
volumes = {v["name"]: v for v in spec.get("volumes", [])}
mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
for path, vol in mounts.items():
    if vol not in volumes:
        problem(f"{ds_file}: mount {path} names no volume {vol}")
for path in ["/sys/kernel/tracing", "/sys/fs/cgroup", "/var/lib/stormguard", "/run/stormguard",
             "/etc/stormguard"]:
    if path not in mounts:
        problem(f"{ds_file}: nothing mounted at {path}")
cm_file, cm = objs["ConfigMap"]
config_vol = volumes.get(mounts.get("/etc/stormguard"), {})
if config_vol.get("configMap", {}).get("name") != cm["metadata"]["name"]:
    problem(f"{ds_file}: /etc/stormguard is not the ConfigMap {cm['metadata']['name']}")
command = c.get("command", []) + c.get("args", [])
if "--config" not in command or command[command.index("--config") + 1] != "/etc/stormguard/config.toml":
    problem(f"{ds_file}: the daemon is not given /etc/stormguard/config.toml")

# ConfigMap: config.toml serves metrics on every address, on the port named
# metrics (config.toml itself is checked by `stormguard config check` in
# tests/tests/deploy_assets.rs).
toml = cm["data"].get("config.toml", "")
m = re.search(r'^listen\s*=\s*"([^"]*)"', toml, re.M)
if not m:
    problem(f"{cm_file}: config.toml sets no [metrics] listen")
else:
    host, _, port = m.group(1).rpartition(":")
    if host not in ("0.0.0.0", "[::]"):
        problem(f"{cm_file}: metrics listen {m.group(1)} is not on the pod IP (0.0.0.0)")
    if ports.get("metrics") is not None and port != str(ports["metrics"]):
        problem(f"{cm_file}: metrics port {port} != containerPort {ports.get('metrics')}")

# Service: headless, selects the pods, targets the metrics port.
svc_file, svc = objs["Service"]
if svc["spec"].get("clusterIP") != "None":
    problem(f"{svc_file}: not headless (clusterIP: None)")
if not svc["spec"].get("selector") or not subset(svc["spec"]["selector"], pod_labels):
    problem(f"{svc_file}: selector does not match the DaemonSet's pods")
for p in svc["spec"]["ports"]:
    t = p.get("targetPort")
    if t not in ports and t not in ports.values():
        problem(f"{svc_file}: targetPort {t!r} is not a container port")

# PodMonitor (monitoring.coreos.com/v1).
pm_file, pm = objs["PodMonitor"]
if pm.get("apiVersion") != "monitoring.coreos.com/v1":
    problem(f"{pm_file}: apiVersion is not monitoring.coreos.com/v1")
pm_spec = pm.get("spec", {})
sel = pm_spec.get("selector", {}).get("matchLabels")
if not sel or not subset(sel, pod_labels):
    problem(f"{pm_file}: selector.matchLabels does not match the DaemonSet's pods")
if NAMESPACE not in pm_spec.get("namespaceSelector", {}).get("matchNames", []):
    problem(f"{pm_file}: namespaceSelector does not name {NAMESPACE}")
endpoints = pm_spec.get("podMetricsEndpoints", [])
if not endpoints:
    problem(f"{pm_file}: no podMetricsEndpoints")
for e in endpoints:
    if e.get("port") not in ports:
        problem(f"{pm_file}: port {e.get('port')!r} is not a named port of the pod")
    if e.get("path", "/metrics") != "/metrics":
        problem(f"{pm_file}: path {e.get('path')} is not /metrics")
job = pod_labels.get(pm_spec.get("jobLabel", ""))
if job != "stormguard":
    problem(f"{pm_file}: jobLabel gives job={job!r}, the rules expect job=\"stormguard\"")

# PrometheusRule: the same groups as the rules file promtool checks.
pr_file, pr = objs["PrometheusRule"]
if pr.get("apiVersion") != "monitoring.coreos.com/v1":
    problem(f"{pr_file}: apiVersion is not monitoring.coreos.com/v1")
rules_path = DEPLOY / "prometheus/stormguard-rules.yaml"
rules = yaml.safe_load(rules_path.read_text())
groups = pr.get("spec", {}).get("groups")
if groups != rules.get("groups"):
    problem(
        f"{pr_file}: spec.groups differs from deploy/prometheus/stormguard-rules.yaml (the "
        "source); copy its groups into spec.groups"
    )
alerts = []
for g in rules.get("groups", []):
    if not g.get("name") or not g.get("rules"):
        problem(f"{rules_path.name}: a group without name or rules")
    for r in g.get("rules", []):
        if not r.get("expr") or not (r.get("alert") or r.get("record")):
            problem(f"{rules_path.name}: a rule without alert/record or expr: {r}")
        if r.get("alert"):
            alerts.append(r["alert"])
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problem(f"{rules_path.name}: {r['alert']} has no severity")
            for a in ("summary", "description"):
                if not r.get("annotations", {}).get(a):
                    problem(f"{rules_path.name}: {r['alert']} has no {a}")

# Every alert is tested firing and not firing.
tests = yaml.safe_load((DEPLOY / "prometheus/stormguard-rules.test.yaml").read_text())
fires, quiet = set(), set()
for t in tests.get("tests", []):
    for a in t.get("alert_rule_test", []):
        (fires if a.get("exp_alerts") else quiet).add(a["alertname"])
for a in alerts:
    if a not in fires:
        problem(f"stormguard-rules.test.yaml: no test where {a} fires")
    if a not in quiet:
        problem(f"stormguard-rules.test.yaml: no test where {a} stays quiet")

# Grafana: valid JSON, the two variables, every query on them.
dash_path = DEPLOY / "grafana/stormguard.json"
try:
    dash = json.loads(dash_path.read_text())
except ValueError as e:
    problem(f"{dash_path.name}: not valid JSON: {e}")
    dash = {"panels": [], "templating": {"list": []}}
variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource" or \
        variables.get("datasource", {}).get("query") != "prometheus":
    problem(f"{dash_path.name}: no Prometheus datasource variable")
if variables.get("instance", {}).get("type") != "query":
    problem(f"{dash_path.name}: no instance variable")
ids = set()
queries = 0
charts = 0
for p in dash.get("panels", []):
    if p.get("id") in ids:
        problem(f"{dash_path.name}: panel id {p.get('id')} twice")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    charts += 1
    if p.get("datasource", {}).get("uid") != "${datasource}":
        problem(f"{dash_path.name}: panel {p.get('title')!r} is not on $datasource")
    if not p.get("targets"):
        problem(f"{dash_path.name}: panel {p.get('title')!r} has no query")
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        queries += 1
        if "stormguard_" not in expr or '$instance' not in expr:
            problem(f"{dash_path.name}: {p.get('title')!r}: {expr!r} is not on $instance")
        if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
            problem(f"{dash_path.name}: {p.get('title')!r}: unbalanced {expr!r}")
    if "stormguard_storm_attempts_per_second" in json.dumps(p.get("targets")) and \
            "per_storm = true" not in p.get("description", ""):
        problem(f"{dash_path.name}: {p.get('title')!r} does not say it needs per_storm = true")

# The dashboard's queries as recording rules, Grafana's variables filled
# in, for `promtool check rules` to parse (xtask runs it on this file).
if len(sys.argv) > 2:
    filled = []
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, value in (("$__rate_interval", "1m"), ("$__range", "6h"),
                               ("$instance", ".*")):
                expr = expr.replace(var, value)
            filled.append({"record": f"dashboard:query_{len(filled)}", "expr": expr})
    pathlib.Path(sys.argv[2]).write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": filled}]}, sort_keys=False))

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(
    f"deploy: {len(objs)} objects tie together; {len(alerts)} alerts, each tested firing and "
    f"quiet; PrometheusRule = rules file; dashboard: {charts} panels, {queries} queries"
)
