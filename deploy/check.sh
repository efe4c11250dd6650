#!/usr/bin/env bash
# Offline validation of deploy/ and docker-compose.yml; meant to be called from
# .ci/run (`bash deploy/check.sh`). It prints each check and exits non-zero on
# the first failing step. Safe to run again and again: tools are installed once.
#
#   deploy/check.sh                          run every check
#   deploy/check.sh --sync-prometheusrule    regenerate deploy/kubernetes/prometheusrule.yaml
#                                            from deploy/prometheus/alerts.yml, then check
#
# Tools, installed on first use into $MAIL_DISPATCH_DEPLOY_TOOLS
# (default: ~/.cache/mail-dispatch/deploy-tools), versions pinned below:
#   - a Python venv with PyYAML, check-jsonschema (it ships the Compose
#     Specification schema) and kubernetes-validate (it ships Kubernetes' OpenAPI
#     schemas), from PyPI with pip;
#   - promtool, from Debian's `prometheus` package: `apt-get download` and
#     `dpkg-deb -x` into the tools folder, so no Prometheus service is installed
#     or started (a promtool already on PATH is used as is);
#   - @kubernetes-models/keda and @kubernetes-models/prometheus-operator (the KEDA
#     and Prometheus Operator CRD schemas, compiled), from npm, when node and npm
#     exist; otherwise those schema checks are skipped.
# kubectl (`kubectl kustomize`) or kustomize renders the base when one is on PATH;
# otherwise a simplified rendering (resources + ConfigMap from config.env) is checked.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_REQS=(PyYAML==6.0.3 check-jsonschema==0.39.0 kubernetes-validate==1.37.0)
NPM_PKGS=(@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0)
# Kubernetes versions whose schemas the manifests must satisfy (oldest we support, newest known).
K8S_VERSIONS=(1.29.0 1.37.0)

TOOLS="${MAIL_DISPATCH_DEPLOY_TOOLS:-${HOME:-/root}/.cache/mail-dispatch/deploy-tools}"
VENV="$TOOLS/venv"
NPM_DIR="$TOOLS/npm"
PROM_DIR="$TOOLS/prometheus"

log() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'deploy/check.sh: FAILED: %s\n' "$*" >&2; exit 1; }
SKIPPED=()
skip() { printf '    SKIPPED: %s\n' "$*"; SKIPPED+=("$*"); }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SYNC=false
for arg in "$@"; do
  case "$arg" in
    --sync-prometheusrule) SYNC=true ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument $arg" ;;
  esac
done

# ---------------------------------------------------------------- tools ----
log "tools (in $TOOLS)"
mkdir -p "$TOOLS"

apt_install() { # package...
  command -v apt-get >/dev/null 2>&1 || die "apt-get is not available to install $*"
  info "installing $* (apt)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

want="${PY_REQS[*]}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements" 2>/dev/null)" != "$want" ]]; then
  command -v python3 >/dev/null 2>&1 || apt_install python3
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  info "pip install ${PY_REQS[*]} (PyPI)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQS[@]}"
  printf '%s' "$want" >"$VENV/.requirements"
fi
PY="$VENV/bin/python"
info "python venv: $("$PY" -c 'import yaml; print("PyYAML", yaml.__version__)'), $("$VENV/bin/check-jsonschema" --version | head -n1), $("$VENV/bin/kubernetes-validate" --version 2>&1 | head -n1)"

if command -v promtool >/dev/null 2>&1; then
  PROMTOOL="$(command -v promtool)"
elif [[ -x "$PROM_DIR/usr/bin/promtool" ]]; then
  PROMTOOL="$PROM_DIR/usr/bin/promtool"
else
  command -v apt-get >/dev/null 2>&1 || die "promtool is not on PATH and apt-get is not available"
  info "promtool: apt-get download prometheus (Debian), extracting promtool only"
  mkdir -p "$WORK/deb" && chmod 0777 "$WORK/deb"
  if ! (cd "$WORK/deb" && apt-get download -qq prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null
    (cd "$WORK/deb" && apt-get download -qq prometheus >/dev/null 2>&1) \
      || die "apt-get download prometheus failed"
  fi
  rm -rf "$PROM_DIR.tmp" && mkdir -p "$PROM_DIR.tmp"
  dpkg-deb -x "$WORK"/deb/prometheus_*.deb "$PROM_DIR.tmp"
  rm -rf "$PROM_DIR" && mv "$PROM_DIR.tmp" "$PROM_DIR"
  PROMTOOL="$PROM_DIR/usr/bin/promtool"
fi
info "promtool: $("$PROMTOOL" --version 2>&1 | head -n1)"

NODE_OK=false
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  want_npm="${NPM_PKGS[*]}"
  if [[ "$(cat "$NPM_DIR/.packages" 2>/dev/null)" != "$want_npm" ]]; then
    info "npm install ${NPM_PKGS[*]} (npm registry)"
    rm -rf "$NPM_DIR" && mkdir -p "$NPM_DIR"
    printf '{"name":"mail-dispatch-deploy-check","private":true}\n' >"$NPM_DIR/package.json"
    if (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error "${NPM_PKGS[@]}" >/dev/null 2>"$WORK/npm.err"); then
      printf '%s' "$want_npm" >"$NPM_DIR/.packages"
    else
      cat "$WORK/npm.err" >&2
      die "npm install ${NPM_PKGS[*]} failed"
    fi
  fi
  NODE_OK=true
  info "node $(node --version) with ${NPM_PKGS[*]}"
else
  info "node/npm not found: the KEDA and Prometheus Operator resources get structural checks only"
fi

KUSTOMIZE=()
if command -v kustomize >/dev/null 2>&1; then
  KUSTOMIZE=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then
  KUSTOMIZE=(kubectl kustomize)
fi
if ((${#KUSTOMIZE[@]})); then
  info "renderer: ${KUSTOMIZE[*]} ($("${KUSTOMIZE[0]}" version --client 2>/dev/null | tr '\n' ' ' | cut -c1-80))"
fi

if $SYNC; then
  log "regenerating deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml"
  "$PY" deploy/checks.py sync-prometheusrule
fi

# ----------------------------------------------------------------- YAML ----
log "every YAML file under deploy/ and docker-compose.yml parses (PyYAML, duplicate keys refused)"
"$PY" deploy/checks.py yaml || die "YAML"

# -------------------------------------------------------------- compose ----
log "docker-compose.yml against the Compose Specification schema (check-jsonschema --builtin-schema vendor.compose-spec)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml || die "compose schema"
log "docker-compose.yml cross-references (mounts, ports, Prometheus targets, Grafana)"
"$PY" deploy/checks.py compose || die "compose"

# ----------------------------------------------------------- prometheus ----
log "promtool check config deploy/prometheus/prometheus.yml"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml || die "prometheus.yml"
log "promtool check rules deploy/prometheus/alerts.yml"
"$PROMTOOL" check rules deploy/prometheus/alerts.yml || die "alerts.yml"
"$PY" deploy/checks.py promql-files "$WORK/promql" || die "promql files"
log "promtool test rules deploy/prometheus/alerts.test.yml (on alerts.yml without annotations)"
(cd "$WORK/promql" && "$PROMTOOL" test rules alerts.test.yml) || die "alert unit tests"
log "alerts: metric names and labels against the code, runbook anchors, test coverage, PrometheusRule copy"
"$PY" deploy/checks.py rules || die "alert rules"

# -------------------------------------------------------------- grafana ----
log "Grafana dashboard: JSON, panels, metric names and labels against crates/worker/src/metrics.rs, provisioning"
"$PY" deploy/checks.py dashboard || die "dashboard"
log "every dashboard query parses as PromQL (promtool check rules on the queries as recording rules)"
"$PROMTOOL" check rules "$WORK/promql/dashboard-queries.yml" || die "dashboard PromQL"

# ----------------------------------------------------------- kubernetes ----
BASE=deploy/kubernetes
BUILT="$WORK/k8s.yaml"
if ((${#KUSTOMIZE[@]})); then
  log "${KUSTOMIZE[*]} $BASE"
  "${KUSTOMIZE[@]}" "$BASE" >"$BUILT" || die "kustomize build"
else
  skip "no kustomize or kubectl on PATH: kustomize build not run; checking a simplified rendering"
  "$PY" - "$BUILT" <<'EOF' || die "simplified rendering"
import sys, yaml
from pathlib import Path
base = Path("deploy/kubernetes")
k = yaml.safe_load((base / "kustomization.yaml").read_text())
docs = []
for r in k.get("resources", []):
    docs += [d for d in yaml.safe_load_all((base / r).read_text()) if d]
for g in k.get("configMapGenerator", []):
    data = {}
    for env in g.get("envs", []):
        for line in (base / env).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
Path(sys.argv[1]).write_text(yaml.safe_dump_all(docs, sort_keys=False))
EOF
fi
info "$(grep -c '^kind:' "$BUILT") objects rendered"

log "Kubernetes manifests: structure and cross-references"
"$PY" deploy/checks.py k8s "$BUILT" "$WORK/validate" || die "kubernetes structure"

for v in "${K8S_VERSIONS[@]}"; do
  log "kubernetes-validate --strict -k $v (core kinds and secret.example.yaml)"
  out="$("$VENV/bin/kubernetes-validate" --strict --no-warn -k "$v" "$WORK"/validate/core-*.yaml 2>&1)" \
    || { printf '%s\n' "$out"; die "Kubernetes $v schemas"; }
  printf '%s\n' "$out" | sed 's/^/    /'
done

if $NODE_OK; then
  log "KEDA and Prometheus Operator resources against their CRD schemas (@kubernetes-models)"
  cat >"$NPM_DIR/validate-crds.mjs" <<'EOF'
// Validates custom resources with the compiled CRD schemas of @kubernetes-models.
import { readFileSync } from "node:fs";
const models = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
  "keda.sh/v1alpha1/TriggerAuthentication": "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
};
let failed = 0;
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const what = `${doc.kind} ${doc.metadata.name}`;
  if (!models[key]) { console.log(`  FAIL  ${what}: no schema for ${key}`); failed++; continue; }
  const mod = await import(models[key]);
  const Model = mod[doc.kind];
  try { new Model(doc).validate(); console.log(`    ok  ${what} (${doc.apiVersion})`); }
  catch (e) { console.log(`  FAIL  ${what}: ${e.message}`); failed++; }
}
process.exit(failed ? 1 : 0);
EOF
  (cd "$NPM_DIR" && node validate-crds.mjs "$WORK/validate/crds.json") || die "CRD schemas"
else
  skip "node/npm not found: KEDA and Prometheus Operator resources not checked against their CRD schemas"
fi

if ((${#KUSTOMIZE[@]})); then
  log "an overlay with namePrefix and namespace keeps every reference intact (kustomizeconfig.yaml)"
  mkdir -p "$WORK/overlay-prefix"
  base_rel="$("$PY" -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD/$BASE" "$WORK/overlay-prefix")"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: mail\nnamePrefix: acme-\nresources:\n  - %s\n' \
    "$base_rel" >"$WORK/overlay-prefix/kustomization.yaml"
  "${KUSTOMIZE[@]}" "$WORK/overlay-prefix" >"$WORK/prefixed.yaml" || die "prefixed overlay build"
  "$PY" deploy/checks.py k8s-refs "$WORK/prefixed.yaml" || die "prefixed overlay references"

  log "the overlay of docs/operations.md (without KEDA and Prometheus Operator) builds"
  base_rel="$("$PY" -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD/$BASE" "$WORK/overlay-plain")"
  "$PY" deploy/checks.py overlay-from-docs "$WORK/overlay-plain" "$base_rel" || die "docs overlay"
  "${KUSTOMIZE[@]}" "$WORK/overlay-plain" >"$WORK/plain.yaml" || die "docs overlay build"
  "$PY" deploy/checks.py overlay-check "$WORK/plain.yaml" || die "docs overlay content"
else
  skip "no kustomize or kubectl on PATH: overlays not built"
fi

# ---------------------------------------------------------------- done -----
if ((${#SKIPPED[@]})); then
  log "deploy/check.sh: all run checks passed; ${#SKIPPED[@]} skipped:"
  for s in "${SKIPPED[@]}"; do info "- $s"; done
else
  log "deploy/check.sh: all checks passed"
fi
