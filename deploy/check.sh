#!/usr/bin/env bash
# Checks the deployment files without Docker or a cluster (CI runs it from .ci/run):
#   - docker-compose.yml with Debian's docker-compose (`config -q`), and every file it
#     or the Dockerfile takes from the repository exists;
#   - deploy/prometheus/prometheus.yml with promtool, when promtool is installed;
#   - the core Kubernetes manifests (deploy/k8s/*.yaml) with kubernetes-validate, strict,
#     against the oldest and newest Kubernetes versions below;
#   - the ConfigMap's policy is policies/excedo.toml, byte for byte;
#   - the CRD examples (deploy/k8s/examples/) parse as YAML and name a kind: their
#     schemas are not available offline, so that is all that can be checked here.
# With CDRGUARD_BIN=path/to/cdrguard, the compose and Kubernetes configurations are also
# checked with `cdrguard run --check` (a throwaway key, the repository's policy).
#
# Installs docker-compose (apt-get) and kubernetes-validate (pip, in a virtualenv under
# ~/.cache/cdrguard) when missing. Exits non-zero on the first problem.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.30.0 1.37.0)
KV_VERSION=1.37.0
KV_ENV=${XDG_CACHE_HOME:-$HOME/.cache}/cdrguard/kubernetes-validate-$KV_VERSION

fail() { echo "deploy/check.sh: $*" >&2; exit 1; }

if ! command -v docker-compose >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq docker-compose; } >/dev/null 2>&1 ||
    fail "could not install docker-compose with apt-get"
fi
if [ ! -x "$KV_ENV/bin/kubernetes-validate" ]; then
  # A virtualenv of its own: Debian's Python refuses system-wide pip installs.
  if ! python3 -m venv "$KV_ENV" >/dev/null 2>&1; then
    { apt-get update -qq && apt-get install -y -qq python3-venv; } >/dev/null 2>&1 ||
      fail "could not install python3-venv with apt-get"
    python3 -m venv "$KV_ENV" >/dev/null || fail "could not create $KV_ENV"
  fi
  "$KV_ENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >/dev/null ||
    fail "could not install kubernetes-validate with pip"
fi
PY="$KV_ENV/bin/python" # has PyYAML, which kubernetes-validate depends on

echo "docker-compose.yml: docker-compose $(docker-compose version --short) config"
docker-compose -f docker-compose.yml config -q

# What the image build and the stack take from the repository must exist: a missing
# bind-mount source would be created empty by Docker instead of failing.
"$PY" - <<'EOF'
import os, re, sys, yaml
missing = []
for line in open("Dockerfile"):
    m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
    if m:
        missing += [p for p in m.group(1).split()[:-1] if not os.path.exists(p)]
compose = yaml.safe_load(open("docker-compose.yml"))
for name, svc in compose["services"].items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith((".", "/")) and not os.path.exists(src):
            missing.append(f"{src} (service {name})")
if missing:
    sys.exit("missing: " + ", ".join(missing))
print("Dockerfile COPY sources and compose bind mounts: present")
EOF

if command -v promtool >/dev/null 2>&1; then
  promtool check config --syntax-only deploy/prometheus/prometheus.yml >/dev/null
  echo "deploy/prometheus/prometheus.yml: promtool check config"
else
  echo "deploy/prometheus/prometheus.yml: promtool not installed, not checked"
fi

for v in "${K8S_VERSIONS[@]}"; do
  "$KV_ENV/bin/kubernetes-validate" --strict --quiet -k "$v" deploy/k8s/*.yaml
  echo "deploy/k8s/*.yaml: kubernetes-validate --strict, Kubernetes $v"
done

"$PY" - <<'EOF'
import glob, sys, yaml
data = yaml.safe_load(open("deploy/k8s/configmap.yaml"))["data"]
if data["excedo.toml"] != open("policies/excedo.toml").read():
    sys.exit("deploy/k8s/configmap.yaml: excedo.toml differs from policies/excedo.toml")
n = 0
for f in sorted(glob.glob("deploy/k8s/examples/*.yaml")):
    for doc in yaml.safe_load_all(open(f)):
        if not (doc and doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")):
            sys.exit(f"{f}: a document without apiVersion, kind or metadata.name")
        n += 1
print(f"ConfigMap policy = policies/excedo.toml; {n} CRD example resources parse (schemas not checked)")
EOF

if [ -n "${CDRGUARD_BIN:-}" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$CDRGUARD_BIN" keys generate --out "$tmp/keys.toml" >/dev/null
  "$PY" -c 'import sys, yaml; open(sys.argv[2], "w").write(yaml.safe_load(open(sys.argv[1]))["data"]["cdrguard.toml"])' \
    deploy/k8s/configmap.yaml "$tmp/k8s.toml"
  cp policies/excedo.toml "$tmp/excedo.toml"
  CDRGUARD_PROCESSING__POLICY="$PWD/policies/excedo.toml" CDRGUARD_PROCESSING__KEY_FILE="$tmp/keys.toml" \
    "$CDRGUARD_BIN" run --config deploy/compose/cdrguard.toml --check
  CDRGUARD_PROCESSING__KEY_FILE="$tmp/keys.toml" CDRGUARD_KAFKA__TRANSACTIONAL_ID=cdrguard-0 \
    "$CDRGUARD_BIN" run --config "$tmp/k8s.toml" --check
fi
