#!/usr/bin/env bash
# Validate the Kubernetes example (deploy/kubernetes/*.yaml) against the Kubernetes API schemas with
# PyPI's kubernetes-validate, strict: an unknown or misspelt field is an error, not ignored.
# Installs kubernetes-validate into a virtual environment under target/ once (VENV names another).
# KUBERNETES_VERSION picks the schema version (default: kubernetes-validate's newest).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-target/kubernetes-validate-venv}
version=1.37.0 # kubernetes-validate, pinned
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$version"; then
  echo "validate-kubernetes: installing kubernetes-validate $version into $venv" >&2
  python3 -m venv --clear "$venv" # --clear: a venv moved with its target/ keeps stale paths
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi
args=(--strict)
if [ -n "${KUBERNETES_VERSION:-}" ]; then args+=(--kubernetes-version "$KUBERNETES_VERSION"); fi
"$venv/bin/kubernetes-validate" "${args[@]}" deploy/kubernetes/*.yaml
echo "validate-kubernetes: deploy/kubernetes/*.yaml valid (strict)" >&2
