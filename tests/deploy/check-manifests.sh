#!/usr/bin/env bash
# Static checks of sflb's deployment files (deploy/Dockerfile, .dockerignore,
# deploy/docker-compose.yml, deploy/k8s/): see tests/deploy/README.md. Registered with ctest as
# `deploy_manifests` (label `deploy`); run it directly with:
#
#   bash tests/deploy/check-manifests.sh
#
# Needs Node.js 20+ with npm (npm packages are installed into tests/deploy/node_modules from
# package-lock.json on first use) and, for rendering with the real kustomize, kubectl 1.21+ on
# PATH; without one, the subset renderer in lib/kustomize.mjs is used and said so.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "check-manifests: node and npm are required (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if ((node_major < 20)); then
  echo "check-manifests: Node.js 20+ required, found $(node --version)" >&2
  exit 1
fi

# (Re)install the pinned packages when node_modules is missing or older than the lock file.
stamp="node_modules/.sflb-lock.sha256"
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "check-manifests: installing npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

if command -v kubectl >/dev/null 2>&1; then
  echo "check-manifests: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
else
  echo "check-manifests: no kubectl on PATH; rendering with the subset renderer (lib/kustomize.mjs)"
fi

exec node --test --test-reporter=spec \
  k8s.test.mjs compose.test.mjs dockerfile.test.mjs renderer.test.mjs
