#!/usr/bin/env python3
"""Offline checks of deploy/ and docker-compose.yml, called by deploy/check.sh.

Each subcommand prints what it checked and exits non-zero on the first kind of
failure it finds (all failures of that kind are listed). Needs PyYAML only.

  checks.py yaml                        every YAML file parses, no duplicate keys
  checks.py compose                     cross-references of docker-compose.yml
  checks.py promql-files OUTDIR         writes files for promtool (see below)
  checks.py rules                       metric names, labels, runbooks, tests of alerts.yml
  checks.py dashboard                   the Grafana dashboard and its provisioning
  checks.py k8s BUILT.yaml OUTDIR       structure of the rendered kustomize base
  checks.py k8s-refs BUILT.yaml         references still resolve after an overlay
  checks.py overlay-from-docs OUTDIR BASE   writes the overlay shown in docs/operations.md
  checks.py overlay-check BUILT.yaml    what that overlay renders
  checks.py sync-prometheusrule         rewrites kubernetes/prometheusrule.yaml
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts.test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mail-dispatch.json"
GRAFANA_DS = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASH_PROV = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROMETHEUSRULE = K8S / "prometheusrule.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
COMPOSE = ROOT / "docker-compose.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_RS = ROOT / "crates" / "worker" / "src" / "metrics.rs"
# The settings: settings.rs and one file per group under settings/.
SETTINGS_RS = ROOT / "crates" / "cli" / "src" / "settings.rs"
SETTINGS_DIR = ROOT / "crates" / "cli" / "src" / "settings"
TOPOLOGY_RS = ROOT / "crates" / "broker" / "src" / "topology.rs"

SECRET_NAME = "mail-dispatch"
# Settings that are secrets: never in the ConfigMap, always from the Secret.
SECRET_SETTINGS = {
    "MAIL_DISPATCH_TOKEN_KEY",
    "MAIL_DISPATCH_TOKEN_KEY_PREVIOUS",
    "MAIL_DISPATCH_AMQP_URL",
    "MAIL_DISPATCH_DATABASE_URL",
    "MAIL_DISPATCH_ADMIN_TOKEN",
    "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
    "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
}
# Labels Prometheus (or the Prometheus Operator) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "container", "endpoint", "service", "node"}
# Labels of the rabbitmq_prometheus per-object metrics used here.
RABBITMQ_LABELS = {"vhost", "queue"}

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)


def ok(msg: str) -> None:
    print(f"    ok  {msg}")


def finish(what: str) -> None:
    if failures:
        for f in failures:
            print(f"  FAIL  {f}")
        print(f"{what}: {len(failures)} problem(s)")
        sys.exit(1)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------
# YAML with duplicate-key detection (PyYAML silently keeps the last one).
class UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_all(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


def load_yaml(path: Path):
    docs = load_yaml_all(path)
    if len(docs) != 1:
        raise ValueError(f"{rel(path)}: expected one YAML document, found {len(docs)}")
    return docs[0]


def cmd_yaml() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    files.append(COMPOSE)
    for p in files:
        try:
            docs = load_yaml_all(p)
        except Exception as e:  # noqa: BLE001 - report any parse error
            fail(f"{rel(p)} does not parse: {e}")
            continue
        if not docs:
            fail(f"{rel(p)} is empty")
            continue
        ok(f"{rel(p)} ({len(docs)} document{'s' if len(docs) > 1 else ''})")
    finish("YAML")


# --------------------------------------------------------------------------
# What the Rust code defines: metric names and labels, settings, queue names.
def metric_names() -> dict[str, str]:
    """Constant name -> metric name, from crates/worker/src/metrics.rs."""
    text = METRICS_RS.read_text(encoding="utf-8")
    consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([a-z_:]+)";', text))
    if not consts:
        raise SystemExit(f"no metric names found in {rel(METRICS_RS)}")
    return consts


def _macro_args(text: str, start: int) -> str:
    """The text inside the parentheses opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return text[start + 1:]


def metric_labels() -> dict[str, set[str]]:
    """Metric name -> label names used where it is recorded (all of crates/)."""
    consts = metric_names()
    labels: dict[str, set[str]] = {name: set() for name in consts.values()}
    for rs in (ROOT / "crates").rglob("*.rs"):
        text = rs.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"\b(?:counter|gauge|histogram)!\s*\(", text):
            args = _macro_args(text, m.end() - 1)
            first = args.split(",", 1)[0].strip()
            const = first.rsplit("::", 1)[-1]
            name = consts.get(const)
            if name is None:
                continue
            labels[name].update(re.findall(r'"([a-zA-Z_][a-zA-Z0-9_]*)"\s*=>', args))
    return labels


def settings_env() -> set[str]:
    files = [SETTINGS_RS, *sorted(SETTINGS_DIR.glob("*.rs"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in files)
    names = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', text))
    if not names:
        raise SystemExit(f"no environment variables found in {rel(SETTINGS_DIR)}")
    return names


def default_jobs_queue() -> str:
    text = TOPOLOGY_RS.read_text(encoding="utf-8")
    m = re.search(r'jobs_queue:\s*format!\("\{prefix\}([^"]+)"\)', text)
    if not m:
        raise SystemExit(f"jobs queue name not found in {rel(TOPOLOGY_RS)}")
    return m.group(1)


# --------------------------------------------------------------------------
# PromQL: metric names and label names used by an expression.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "absent", "absent_over_time", "abs", "clamp_min",
    "clamp_max", "vector", "scalar", "time", "label_replace", "label_join", "sort",
    "sort_desc", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "changes", "resets", "round", "ceil", "floor",
    "predict_linear", "le", "inf", "nan", "e",
}


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def promql_usage(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, labels in its matchers)], labels in by/without/on/ignoring)."""
    metrics = []
    # Durations like [5m] and numbers are not metric names.
    body = re.sub(r"\[[^\]]*\]", "", expr)
    for m in SELECTOR.finditer(body):
        name, matchers = m.group(1), m.group(2) or ""
        if name.lower() in PROMQL_WORDS or name.startswith("$"):
            continue
        # A function call (name followed by "(") is not a metric.
        rest = body[m.end():].lstrip()
        if not matchers and rest.startswith("("):
            continue
        if re.fullmatch(r"[0-9.e+-]+", name):
            continue
        if matchers:
            metrics.append((name, set(MATCHER.findall(matchers))))
        elif name.startswith(("mail_dispatch_", "rabbitmq_", "up")):
            metrics.append((name, set()))
    grouping = set()
    for g in GROUPING.findall(strip_strings(expr)):
        grouping.update(x.strip() for x in g.split(",") if x.strip())
    return metrics, grouping


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and not name.endswith("_total"):
            return name[: -len(suffix)]
    return name


def check_expr(where: str, expr: str, known: set[str], labels: dict[str, set[str]]) -> int:
    """Checks the mail_dispatch_ names and the labels an expression uses."""
    metrics, grouping = promql_usage(expr)
    allowed = set(TARGET_LABELS)
    used = 0
    for name, matcher_labels in metrics:
        if name.startswith("mail_dispatch_"):
            used += 1
            base = base_metric(name)
            if base not in known:
                fail(f"{where}: metric {name} is not defined in {rel(METRICS_RS)}")
                continue
            own = set(labels.get(base, set())) | TARGET_LABELS
            if name.endswith("_bucket"):
                own.add("le")
            for label in matcher_labels - own:
                fail(f"{where}: {name} has no label {label!r} (labels: {sorted(labels.get(base, set()))})")
            allowed |= own
        elif name.startswith("rabbitmq_"):
            allowed |= RABBITMQ_LABELS
            for label in matcher_labels - RABBITMQ_LABELS - TARGET_LABELS:
                fail(f"{where}: {name}: unexpected label {label!r}")
    for label in grouping - allowed - {"le"}:
        fail(f"{where}: groups by {label!r}, which none of its metrics has")
    return used


# --------------------------------------------------------------------------
def github_anchor(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def doc_anchors() -> set[str]:
    if not OPERATIONS.exists():
        fail(f"{rel(OPERATIONS)} is missing")
        return set()
    anchors = set()
    in_code = False
    for line in OPERATIONS.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            anchors.add(github_anchor(m.group(2)))
    return anchors


def alert_rules() -> list[dict]:
    doc = load_yaml(ALERTS)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def cmd_rules() -> None:
    known = set(metric_names().values())
    labels = metric_labels()
    anchors = doc_anchors()
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        fail(f"alert {dup} is defined twice")
    for r in rules:
        where = f"alerts.yml {r['alert']}"
        used = check_expr(where, r["expr"], known, labels)
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                fail(f"{where}: no {key} annotation")
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            fail(f"{where}: severity label must be critical, warning or info")
        url = ann.get("runbook_url", "")
        m = re.fullmatch(r"docs/operations\.md#([\w-]+)", url)
        if not m:
            fail(f"{where}: runbook_url {url!r} is not docs/operations.md#<anchor>")
        elif m.group(1) != r["alert"].lower():
            fail(f"{where}: runbook anchor {m.group(1)!r} should be {r['alert'].lower()!r}")
        elif m.group(1) not in anchors:
            fail(f"{where}: docs/operations.md has no heading for #{m.group(1)}")
        _ = used
    ok(f"{len(rules)} alerts: metric names and labels exist in the code, runbook anchors exist in docs/operations.md")

    # Every alert is shown to fire by at least one unit test.
    tests = load_yaml(ALERTS_TEST)
    fired = {t["alertname"] for group in tests["tests"] for t in group.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    tested = {t["alertname"] for group in tests["tests"] for t in group.get("alert_rule_test", [])}
    for n in names:
        if n not in fired:
            fail(f"alerts.test.yml: no test shows {n} firing")
    for n in sorted(tested - set(names)):
        fail(f"alerts.test.yml: tests an alert that does not exist: {n}")
    ok(f"alerts.test.yml shows each of the {len(names)} alerts firing")

    # The queue the rules watch is the one the code declares.
    queue = default_jobs_queue()
    text = ALERTS.read_text(encoding="utf-8")
    for q in re.findall(r'queue="([^"]+)"', text):
        if q not in (queue, "mail.dead"):
            fail(f"alerts.yml watches queue {q!r}; the code declares {queue!r} and mail.dead")
    ok(f"queue names in alerts.yml match the topology ({queue}, mail.dead)")

    # The Prometheus Operator copy is in sync.
    if prometheusrule_doc() != load_yaml(PROMETHEUSRULE):
        fail(f"{rel(PROMETHEUSRULE)} differs from alerts.yml: run deploy/check.sh --sync-prometheusrule")
    else:
        ok(f"{rel(PROMETHEUSRULE)} carries the same groups as alerts.yml")
    finish("alert rules")


def prometheusrule_doc() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "mail-dispatch",
            "labels": {"app.kubernetes.io/name": "mail-dispatch"},
        },
        "spec": {"groups": load_yaml(ALERTS)["groups"]},
    }


class _Literal(str):
    pass


def _literal_representer(dumper, data):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


def cmd_sync_prometheusrule() -> None:
    doc = prometheusrule_doc()
    for g in doc["spec"]["groups"]:
        for r in g["rules"]:
            if "\n" in r["expr"]:
                r["expr"] = _Literal(r["expr"])

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Literal, _literal_representer)
    header = (
        "# GENERATED from deploy/prometheus/alerts.yml by `deploy/check.sh --sync-prometheusrule`:\n"
        "# edit alerts.yml, then regenerate. The same alerting rules as a Prometheus Operator\n"
        "# PrometheusRule. Your Prometheus resource selects rules by label (ruleSelector;\n"
        "# kube-prometheus-stack's default wants `release: <its release name>`): add that\n"
        "# label in an overlay.\n"
    )
    body = yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)
    PROMETHEUSRULE.write_text(header + body, encoding="utf-8")
    print(f"wrote {rel(PROMETHEUSRULE)}")


# --------------------------------------------------------------------------
# Files for promtool: the rules without annotations (for `promtool test rules`,
# whose expectations then need no annotation text) and every dashboard query as a
# recording rule (so that `promtool check rules` parses each of them).
GRAFANA_VARS = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
    "__interval_ms": "60000",
}


def substitute_vars(expr: str, values: dict[str, str]) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            fail(f"dashboard: query uses undefined variable ${name}: {expr}")
            return "x"
        return values[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def dashboard_var_values(d: dict) -> dict[str, str]:
    values = dict(GRAFANA_VARS)
    for v in d.get("templating", {}).get("list", []):
        cur = v.get("current", {}).get("value", "")
        if isinstance(cur, list):
            cur = cur[0] if cur else ""
        if cur == "$__all":
            cur = v.get("allValue") or ".*"
        values[v["name"]] = str(cur)
    return values


def dashboard_targets(d: dict):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(d.get("panels", [])):
        for t in p.get("targets", []) or []:
            yield p, t


def cmd_promql_files(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    doc = load_yaml(ALERTS)
    for g in doc["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (out / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    (out / "alerts.test.yml").write_text(ALERTS_TEST.read_text(encoding="utf-8"), encoding="utf-8")

    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    values = dashboard_var_values(d)
    rules = []
    for p, t in dashboard_targets(d):
        expr = substitute_vars(t.get("expr", ""), values)
        rules.append({"record": f"dashboard:panel_{p['id']}_{t.get('refId', 'A')}", "expr": expr})
    (out / "dashboard-queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False),
        encoding="utf-8")
    finish("promql files")
    print(f"    wrote {len(rules)} dashboard queries and the rules without annotations to {outdir}")


# --------------------------------------------------------------------------
def cmd_dashboard() -> None:
    try:
        d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001
        fail(f"{rel(DASHBOARD)} is not JSON: {e}")
        finish("dashboard")
    ok(f"{rel(DASHBOARD)} parses")
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in d:
            fail(f"dashboard: no {key}")
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        fail("dashboard: schemaVersion should be 36 or later")

    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        fail("dashboard: needs a datasource variable DS_PROMETHEUS of type prometheus")

    # Panels: unique ids, inside the 24-column grid, not overlapping.
    ids, boxes = [], []
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    panels = list(walk(d.get("panels", [])))
    for p in panels:
        ids.append(p.get("id"))
        g = p.get("gridPos", {})
        if not all(k in g for k in ("x", "y", "w", "h")):
            fail(f"dashboard panel {p.get('title')!r}: incomplete gridPos")
            continue
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            fail(f"dashboard panel {p.get('title')!r}: outside the 24-column grid")
        for (other, og) in boxes:
            if (g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"]
                    and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]):
                fail(f"dashboard panels {p.get('title')!r} and {other!r} overlap")
        boxes.append((p.get("title"), g))
        if p.get("type") != "row":
            ds = p.get("datasource", {})
            if ds.get("uid") != "${DS_PROMETHEUS}":
                fail(f"dashboard panel {p.get('title')!r}: datasource should be ${{DS_PROMETHEUS}}")
            if not p.get("targets"):
                fail(f"dashboard panel {p.get('title')!r}: no query")
    if len(ids) != len(set(ids)):
        fail("dashboard: panel ids are not unique")
    ok(f"{len(panels)} panels: unique ids, on the grid, no overlap, datasource ${{DS_PROMETHEUS}}")

    known = set(metric_names().values())
    labels = metric_labels()
    used_metrics = set()
    n = 0
    for p, t in dashboard_targets(d):
        expr = t.get("expr", "")
        if not expr.strip():
            fail(f"dashboard panel {p.get('title')!r}: empty query")
            continue
        if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            fail(f"dashboard panel {p.get('title')!r} query {t.get('refId')}: datasource should be ${{DS_PROMETHEUS}}")
        n += 1
        check_expr(f"dashboard panel {p.get('title')!r}", expr, known, labels)
        used_metrics.update(base_metric(m) for m in re.findall(r"\bmail_dispatch_[a-z_]+", expr))
    for v in variables.values():
        q = v.get("definition") or ""
        for m in re.findall(r"\bmail_dispatch_[a-z_]+", q):
            if base_metric(m) not in known:
                fail(f"dashboard variable {v['name']}: metric {m} is not defined in {rel(METRICS_RS)}")
    ok(f"{n} queries: every mail_dispatch_ metric (suffixes _bucket/_sum/_count removed) is in {rel(METRICS_RS)}, labels exist")
    unused = sorted(known - used_metrics)
    if unused:
        print(f"    note: metrics not on the dashboard: {', '.join(unused)}")

    # Provisioning: the datasource uid the dashboard defaults to, and the path compose mounts.
    ds = load_yaml(GRAFANA_DS)
    uids = {x.get("uid") for x in ds.get("datasources", [])}
    default_uid = (ds_var or {}).get("current", {}).get("value")
    if default_uid not in uids:
        fail(f"dashboard DS_PROMETHEUS defaults to {default_uid!r}; provisioned datasource uids: {sorted(uids)}")
    prov = load_yaml(GRAFANA_DASH_PROV)
    paths = [p.get("options", {}).get("path") for p in prov.get("providers", [])]
    compose = load_yaml(COMPOSE)
    mounts = [str(v) for v in compose.get("services", {}).get("grafana", {}).get("volumes", [])]
    for path in paths:
        if not any(m.endswith(":" + path) or f":{path}:" in m for m in mounts):
            fail(f"dashboards.yml loads {path}, which docker-compose.yml does not mount into grafana")
    ok("provisioning: datasource uid and dashboard path match the dashboard and docker-compose.yml")
    finish("dashboard")


# --------------------------------------------------------------------------
def cmd_compose() -> None:
    c = load_yaml(COMPOSE)
    services = c.get("services", {})
    for name in ("rabbitmq", "postgres", "mail-dispatch", "prometheus", "grafana"):
        if name not in services:
            fail(f"docker-compose.yml: no service {name}")
    # Bind mounts point at files that exist.
    for sname, s in services.items():
        for v in s.get("volumes", []) or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")) and not (ROOT / src).exists():
                fail(f"docker-compose.yml: {sname} mounts {src}, which does not exist")
    ok("services present; bind-mounted paths exist")

    rabbit_ports = [str(p) for p in services.get("rabbitmq", {}).get("ports", [])]
    if not any(p.endswith("15692") for p in rabbit_ports):
        fail("docker-compose.yml: rabbitmq does not expose 15692 (rabbitmq_prometheus)")
    grafana_env = services.get("grafana", {}).get("environment", {})
    if str(grafana_env.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() != "true":
        fail("docker-compose.yml: grafana anonymous access is not enabled")
    if grafana_env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") != "Viewer":
        fail("docker-compose.yml: grafana anonymous role should be Viewer")
    home = grafana_env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    if home and not home.endswith("/" + DASHBOARD.name):
        fail(f"docker-compose.yml: grafana home dashboard {home} is not {DASHBOARD.name}")

    # `run` and `admin` serve the admin API, which refuses to start without a token.
    md = services.get("mail-dispatch", {})
    md_env = md.get("environment", {})
    if (md.get("command") or ["run"])[0] in ("run", "admin"):
        if "MAIL_DISPATCH_ADMIN_TOKEN" not in md_env and str(md_env.get("MAIL_DISPATCH_DEV")).lower() != "true":
            fail("docker-compose.yml: mail-dispatch runs the admin API but sets no MAIL_DISPATCH_ADMIN_TOKEN")
        for k in md_env:
            if k.startswith("MAIL_DISPATCH_") and k not in settings_env():
                fail(f"docker-compose.yml: mail-dispatch sets {k}, which is not a setting")

    # Prometheus scrapes services and ports that compose defines.
    prom = load_yaml(PROM_CONFIG)
    metrics_port = str(md_env.get("MAIL_DISPATCH_METRICS_LISTEN", "")).rsplit(":", 1)[-1]
    jobs = {}
    for sc in prom.get("scrape_configs", []):
        jobs[sc["job_name"]] = sc
        for st in sc.get("static_configs", []):
            for target in st.get("targets", []):
                host, _, port = target.partition(":")
                if host not in services:
                    fail(f"prometheus.yml: target {target} is not a compose service")
                if host == "mail-dispatch" and port != metrics_port:
                    fail(f"prometheus.yml: scrapes mail-dispatch:{port}, but MAIL_DISPATCH_METRICS_LISTEN uses {metrics_port}")
    if "mail-dispatch" not in jobs:
        fail("prometheus.yml: no job named mail-dispatch (the alerts and the dashboard expect it)")
    if jobs.get("rabbitmq", {}).get("metrics_path") != "/metrics/per-object":
        fail("prometheus.yml: scrape RabbitMQ's /metrics/per-object (per-queue series)")
    for rf in prom.get("rule_files", []):
        if not (PROM_CONFIG.parent / rf).exists():
            fail(f"prometheus.yml: rule file {rf} does not exist")
    prom_mounts = [str(v) for v in services.get("prometheus", {}).get("volumes", [])]
    if not any(m.startswith("./deploy/prometheus:") for m in prom_mounts):
        fail("docker-compose.yml: prometheus does not mount ./deploy/prometheus")
    ok("rabbitmq exposes 15692; prometheus targets, job names and rule files match; grafana anonymous viewer")
    finish("compose")


# --------------------------------------------------------------------------
def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def index(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container_of(dep: dict) -> dict:
    cs = dep["spec"]["template"]["spec"]["containers"]
    if len(cs) != 1:
        fail(f"Deployment {dep['metadata']['name']}: expected one container, found {len(cs)}")
    return cs[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_example_keys() -> tuple[set[str], set[str]]:
    """(keys with a value in stringData, keys only mentioned in comments)."""
    doc = load_yaml(SECRET_EXAMPLE)
    given = set((doc.get("stringData") or {}).keys()) | set((doc.get("data") or {}).keys())
    commented = set(re.findall(r"^\s*#\s*(MAIL_DISPATCH_[A-Z0-9_]+):", SECRET_EXAMPLE.read_text(), re.M))
    return given, commented


def cmd_k8s(built: str, outdir: str) -> None:
    docs = load_yaml_all(Path(built))
    settings = settings_env()
    by = index(docs)
    kinds = [d["kind"] for d in docs]

    # Namespace-agnostic, no Secret in the base.
    for d in docs:
        if d["metadata"].get("namespace"):
            fail(f"{d['kind']} {d['metadata']['name']} sets a namespace: the base must be namespace-agnostic")
        if d["kind"] == "Secret":
            fail(f"Secret {d['metadata']['name']} is in the build: secrets must not be part of the base")
    kust = load_yaml(K8S / "kustomization.yaml")
    if "secret.example.yaml" in (kust.get("resources") or []):
        fail("kustomization.yaml lists secret.example.yaml")
    if kust.get("namespace"):
        fail("kustomization.yaml sets a namespace")
    for need in ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject",
                 "TriggerAuthentication", "PodMonitor", "PrometheusRule"):
        if need not in kinds:
            fail(f"the build has no {need}")
    ok(f"{len(docs)} objects ({', '.join(sorted(set(kinds)))}); no namespace, no Secret")

    # ConfigMap: known settings only, no secrets, listeners on all interfaces.
    cms = [d for d in docs if d["kind"] == "ConfigMap"]
    cm = cms[0]["data"] if cms else {}
    for k in cm:
        if k not in settings and k != "RUST_LOG":
            fail(f"ConfigMap key {k} is not a setting of {rel(SETTINGS_DIR)}")
        if k in SECRET_SETTINGS:
            fail(f"ConfigMap carries the secret {k}")
    expect = {"MAIL_DISPATCH_LOG_FORMAT": "json", "MAIL_DISPATCH_METRICS_LISTEN": "0.0.0.0:9090",
              "MAIL_DISPATCH_ADMIN_LISTEN": "0.0.0.0:8080"}
    for k, v in expect.items():
        if cm.get(k) != v:
            fail(f"ConfigMap {k} should be {v!r}, is {cm.get(k)!r}")
    conc = int(cm.get("MAIL_DISPATCH_CONCURRENCY", "64"))
    if not 1 <= conc <= 2000:
        fail("ConfigMap MAIL_DISPATCH_CONCURRENCY must be 1..2000")
    if "MAIL_DISPATCH_PUBLIC_URL" not in cm:
        fail("ConfigMap has no MAIL_DISPATCH_PUBLIC_URL")
    ok(f"ConfigMap: {len(cm)} known, non-secret settings; JSON logs; listeners 0.0.0.0:9090 and 0.0.0.0:8080")

    given, commented = secret_example_keys()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    roles = {}
    for name, dep in deployments.items():
        c = container_of(dep)
        args = (c.get("command") or []) + (c.get("args") or [])
        role = args[-1] if args else None
        roles[role] = dep
        pod = dep["spec"]["template"]["spec"]
        where = f"Deployment {name}"
        if args[:1] != ["mail-dispatch"] or role not in ("worker", "admin"):
            fail(f"{where}: runs {args}, expected mail-dispatch worker|admin")
        if not str(c.get("image", "")).split("/")[-1].startswith("mail-dispatch"):
            fail(f"{where}: image {c.get('image')} is not mail-dispatch")
        # Security.
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") and psc.get("runAsUser") == 10001):
            fail(f"{where}: must run as non-root uid 10001 (the image's user)")
        if not csc.get("readOnlyRootFilesystem"):
            fail(f"{where}: readOnlyRootFilesystem is not set")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in (csc.get("capabilities", {}).get("drop") or []):
            fail(f"{where}: capabilities must drop ALL")
        # Resources.
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    fail(f"{where}: no {part}.{r}")
        # Environment: ConfigMap by envFrom, secrets by secretKeyRef from the Secret.
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef", {}).get("name")
            if ref and ("ConfigMap", ref) not in by:
                fail(f"{where}: envFrom ConfigMap {ref} is not in the build")
        if not any("configMapRef" in ef for ef in c.get("envFrom", [])):
            fail(f"{where}: does not load the ConfigMap with envFrom")
        env = env_of(c)
        for ename, e in env.items():
            if ename not in settings:
                fail(f"{where}: env {ename} is not a setting of {rel(SETTINGS_DIR)}")
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ename in SECRET_SETTINGS and not ref:
                fail(f"{where}: {ename} must come from the Secret (secretKeyRef)")
            if ref:
                if ref.get("name") != SECRET_NAME:
                    fail(f"{where}: {ename} reads Secret {ref.get('name')}, expected {SECRET_NAME}")
                key = ref.get("key")
                if key not in settings:
                    fail(f"{where}: Secret key {key} is not a setting")
                if not ref.get("optional") and key not in given:
                    fail(f"{where}: required Secret key {key} is missing from secret.example.yaml")
                if ref.get("optional") and key not in given | commented:
                    fail(f"{where}: optional Secret key {key} is not mentioned in secret.example.yaml")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports.get("metrics") != 9090:
            fail(f"{where}: no container port `metrics` 9090")
        if role == "worker":
            for k in ("MAIL_DISPATCH_TOKEN_KEY", "MAIL_DISPATCH_AMQP_URL", "MAIL_DISPATCH_DATABASE_URL",
                      "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET", "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET"):
                if k not in env:
                    fail(f"{where}: no {k} from the Secret")
            grace = int(env.get("MAIL_DISPATCH_SHUTDOWN_GRACE_SECS", {}).get("value", "25"))
            tgp = pod.get("terminationGracePeriodSeconds", 30)
            if "MAIL_DISPATCH_SHUTDOWN_GRACE_SECS" not in env:
                fail(f"{where}: MAIL_DISPATCH_SHUTDOWN_GRACE_SECS is not set next to terminationGracePeriodSeconds")
            if not tgp > grace:
                fail(f"{where}: terminationGracePeriodSeconds {tgp} must exceed MAIL_DISPATCH_SHUTDOWN_GRACE_SECS {grace}")
            rp, lp = c.get("readinessProbe", {}), c.get("livenessProbe", {})
            if rp.get("httpGet", {}).get("path") != "/readyz" or rp.get("httpGet", {}).get("port") not in ("metrics", 9090):
                fail(f"{where}: readiness probe must be GET /readyz on port metrics")
            if lp.get("httpGet", {}).get("path") != "/healthz" or lp.get("httpGet", {}).get("port") not in ("metrics", 9090):
                fail(f"{where}: liveness probe must be GET /healthz on port metrics")
            if "replicas" in dep["spec"]:
                fail(f"{where}: sets replicas, which would fight the KEDA ScaledObject")
            ok(f"{where}: mail-dispatch worker, probes /readyz and /healthz on `metrics`, grace {tgp}s > {grace}s, non-root 10001, read-only root")
        elif role == "admin":
            if "MAIL_DISPATCH_ADMIN_TOKEN" not in env:
                fail(f"{where}: no MAIL_DISPATCH_ADMIN_TOKEN from the Secret")
            listen_port = int(cm.get("MAIL_DISPATCH_ADMIN_LISTEN", ":0").rsplit(":", 1)[-1])
            if ports.get("http") != listen_port:
                fail(f"{where}: container port `http` {ports.get('http')} differs from MAIL_DISPATCH_ADMIN_LISTEN {listen_port}")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    fail(f"{where}: no {probe}")
            ok(f"{where}: mail-dispatch admin on `http` {listen_port}, admin token from the Secret, non-root 10001, read-only root")
    for role in ("worker", "admin"):
        if role not in roles:
            fail(f"no Deployment runs mail-dispatch {role}")
    worker = roles.get("worker")
    admin = roles.get("admin")

    # Services and PodMonitor select pods and named ports that exist.
    def template_labels(dep):
        return dep["spec"]["template"]["metadata"]["labels"]

    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Service":
            sel = d["spec"].get("selector", {})
            targets = [dep for dep in deployments.values() if labels_match(sel, template_labels(dep))]
            if not targets:
                fail(f"Service {name}: selector {sel} matches no Deployment")
                continue
            for p in d["spec"]["ports"]:
                tp = p.get("targetPort", p["port"])
                for dep in targets:
                    ports = {x["name"]: x["containerPort"] for x in container_of(dep).get("ports", [])}
                    if isinstance(tp, str) and tp not in ports:
                        fail(f"Service {name}: targetPort {tp} is not a port of {dep['metadata']['name']}")
        if kind == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
            if not any(labels_match(sel, template_labels(dep)) for dep in deployments.values()):
                fail(f"PodDisruptionBudget {name}: selects no Deployment")
            if d["spec"].get("minAvailable") != 1:
                fail(f"PodDisruptionBudget {name}: minAvailable should be 1")
    if admin:
        svc = [d for d in docs if d["kind"] == "Service"
               and labels_match(d["spec"].get("selector", {}), template_labels(admin))]
        if not any(p["port"] == 80 and p.get("targetPort") in ("http", 8080) for s in svc for p in s["spec"]["ports"]):
            fail("no Service maps port 80 to the admin pods' http port")
    if worker:
        svc = [d for d in docs if d["kind"] == "Service"
               and labels_match(d["spec"].get("selector", {}), template_labels(worker))]
        if not any(p.get("targetPort") in ("metrics", 9090) for s in svc for p in s["spec"]["ports"]):
            fail("no Service exposes the workers' metrics port")
        if not any(d["kind"] == "PodDisruptionBudget"
                   and labels_match(d["spec"]["selector"]["matchLabels"], template_labels(worker)) for d in docs):
            fail("no PodDisruptionBudget covers the workers")
    ok("Services, PodDisruptionBudgets: selectors match pod labels, target ports exist; admin 80 -> http, metrics Service")

    for d in docs:
        if d["kind"] != "PodMonitor":
            continue
        sel = d["spec"]["selector"]["matchLabels"]
        if not worker or not labels_match(sel, template_labels(worker)):
            fail(f"PodMonitor {d['metadata']['name']}: does not select the worker pods")
            continue
        ports = {x["name"] for x in container_of(worker).get("ports", [])}
        for ep in d["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in ports:
                fail(f"PodMonitor: port {ep.get('port')} is not a worker port")
        job_label = d["spec"].get("jobLabel")
        if template_labels(worker).get(job_label) != "mail-dispatch":
            fail("PodMonitor: jobLabel must give job=\"mail-dispatch\" (alerts.yml and the dashboard use it)")
        ok("PodMonitor: selects the workers' `metrics` port, job label mail-dispatch")

    # KEDA.
    jobs_queue = default_jobs_queue()
    for d in docs:
        if d["kind"] != "ScaledObject":
            continue
        spec = d["spec"]
        target = spec["scaleTargetRef"]["name"]
        if ("Deployment", target) not in by or by[("Deployment", target)] is not worker:
            fail(f"ScaledObject: scaleTargetRef {target} is not the worker Deployment")
        if spec.get("minReplicaCount") != 2 or spec.get("maxReplicaCount") != 20:
            fail("ScaledObject: replicas should be 2..20")
        for t in spec["triggers"]:
            if t["type"] != "rabbitmq":
                fail(f"ScaledObject: unexpected trigger {t['type']}")
                continue
            md = t["metadata"]
            if md.get("queueName") != jobs_queue:
                fail(f"ScaledObject: queueName {md.get('queueName')} is not {jobs_queue}")
            if md.get("mode") != "QueueLength" or not str(md.get("value", "")).isdigit():
                fail("ScaledObject: mode QueueLength with a numeric value expected")
            if "host" in md:
                fail("ScaledObject: the host (with credentials) must come from the TriggerAuthentication")
            auth = t.get("authenticationRef", {}).get("name")
            ta = by.get(("TriggerAuthentication", auth))
            if not ta:
                fail(f"ScaledObject: TriggerAuthentication {auth} is not in the build")
            else:
                refs = {r["parameter"]: r for r in ta["spec"].get("secretTargetRef", [])}
                host = refs.get("host")
                if not host or host.get("name") != SECRET_NAME or host.get("key") != "MAIL_DISPATCH_AMQP_URL":
                    fail("TriggerAuthentication: host must come from Secret mail-dispatch, key MAIL_DISPATCH_AMQP_URL")
            # The backlog alert fires where KEDA runs out of replicas.
            threshold = re.search(r"MailDispatchBacklogHigh.*?>\s*(\d+)", ALERTS.read_text(), re.S)
            if threshold and int(threshold.group(1)) != spec["maxReplicaCount"] * int(md.get("value", 0)):
                fail(f"MailDispatchBacklogHigh threshold {threshold.group(1)} != maxReplicaCount x value "
                     f"({spec['maxReplicaCount']} x {md.get('value')})")
        ok(f"ScaledObject: worker Deployment, 2..20 replicas, rabbitmq {jobs_queue} QueueLength, host from the Secret's AMQP URL")

    # Secret example.
    sec = load_yaml(SECRET_EXAMPLE)
    if sec.get("kind") != "Secret" or sec["metadata"]["name"] != SECRET_NAME:
        fail("secret.example.yaml: must be Secret mail-dispatch")
    for k in given | commented:
        if k not in settings:
            fail(f"secret.example.yaml: {k} is not a setting")
    if not re.search(r"kubectl .*create secret generic", SECRET_EXAMPLE.read_text()):
        fail("secret.example.yaml: explain `kubectl create secret generic` in a comment")
    ok("secret.example.yaml: Secret mail-dispatch with every key the Deployments read; not in the base")

    # Split for the schema validators: core kinds (kubernetes-validate) and CRDs (node).
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    def is_crd(d):
        group = d["apiVersion"].rsplit("/", 1)[0] if "/" in d["apiVersion"] else ""
        return "." in group and not group.endswith(".k8s.io")
    core = [d for d in docs if not is_crd(d)]
    crds = [d for d in docs if is_crd(d)]
    for i, d in enumerate(core):
        (out / f"core-{i:02d}-{d['kind']}.yaml").write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    (out / "core-99-secret-example.yaml").write_text(yaml.safe_dump(sec, sort_keys=False), encoding="utf-8")
    (out / "crds.json").write_text(json.dumps(crds), encoding="utf-8")
    finish("kubernetes")


def cmd_k8s_refs(built: str) -> None:
    """After an overlay (name prefix, namespace), references still resolve."""
    docs = load_yaml_all(Path(built))
    by = index(docs)
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Deployment":
            for ef in d["spec"]["template"]["spec"]["containers"][0].get("envFrom", []):
                ref = ef.get("configMapRef", {}).get("name")
                if ref and ("ConfigMap", ref) not in by:
                    fail(f"Deployment {name}: ConfigMap {ref} not found")
        if kind == "ScaledObject":
            if ("Deployment", d["spec"]["scaleTargetRef"]["name"]) not in by:
                fail(f"ScaledObject {name}: target {d['spec']['scaleTargetRef']['name']} not found")
            for t in d["spec"]["triggers"]:
                auth = t.get("authenticationRef", {}).get("name")
                if auth and ("TriggerAuthentication", auth) not in by:
                    fail(f"ScaledObject {name}: TriggerAuthentication {auth} not found")
        if kind == "TriggerAuthentication":
            for r in d["spec"].get("secretTargetRef", []):
                if r.get("name") != SECRET_NAME:
                    fail(f"TriggerAuthentication {name}: Secret renamed to {r.get('name')}, but the Secret is created outside kustomize as {SECRET_NAME}")
    finish("overlay references")
    print(f"    ok  {len(docs)} objects; ConfigMap, Deployment and TriggerAuthentication references resolve")


def cmd_overlay_from_docs(outdir: str, base_rel: str) -> None:
    """Writes the overlay shown in docs/operations.md, pointed at the base."""
    text = OPERATIONS.read_text(encoding="utf-8")
    m = re.search(r"<!-- overlay: without-operators -->\s*```yaml\n(.*?)```", text, re.S)
    if not m:
        fail("docs/operations.md: no ```yaml block after <!-- overlay: without-operators -->")
        finish("overlay")
    body = re.sub(r"^(\s*-\s*)\S*deploy/kubernetes\S*.*$", lambda x: x.group(1) + base_rel, m.group(1),
                  count=1, flags=re.M)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kustomization.yaml").write_text(body, encoding="utf-8")
    print(f"    wrote the overlay of docs/operations.md to {outdir}")


def cmd_overlay_check(built: str) -> None:
    docs = load_yaml_all(Path(built))
    kinds = {d["kind"] for d in docs}
    for k in ("ScaledObject", "TriggerAuthentication", "PodMonitor", "PrometheusRule"):
        if k in kinds:
            fail(f"the without-operators overlay still renders a {k}")
    workers = [d for d in docs if d["kind"] == "Deployment"
               and d["spec"]["template"]["spec"]["containers"][0].get("args") == ["worker"]]
    if not workers or (workers[0]["spec"].get("replicas") or 1) < 2:
        fail("the without-operators overlay should run at least 2 workers")
    finish("overlay without operators")
    print(f"    ok  {len(docs)} objects, no KEDA or Prometheus Operator kinds, {workers[0]['spec'].get('replicas')} workers")


def main() -> None:
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    table = {
        "yaml": cmd_yaml,
        "compose": cmd_compose,
        "promql-files": cmd_promql_files,
        "rules": cmd_rules,
        "dashboard": cmd_dashboard,
        "k8s": cmd_k8s,
        "k8s-refs": cmd_k8s_refs,
        "overlay-from-docs": cmd_overlay_from_docs,
        "overlay-check": cmd_overlay_check,
        "sync-prometheusrule": cmd_sync_prometheusrule,
    }
    if cmd not in table:
        print(__doc__)
        sys.exit(2)
    os.chdir(ROOT)
    table[cmd](*args)


if __name__ == "__main__":
    main()
