#!/usr/bin/env bash
# Build the lars_tf image on this machine: `make docker` and tests/test_docker.py run this.
#
#   docker/build.sh [docker build options...]      e.g. docker/build.sh -t lars-tf:cpu
#
# What it adds to a plain `docker build -f docker/Dockerfile .` (docker/README.md has that):
#   - an engine and the base image local/debian:bookworm from tools/docker_engine.sh, for machines
#     without an image registry ($BASE_IMAGE overrides the base, e.g. debian:bookworm-slim);
#   - --network host, so the build reaches the package registries the way this machine does;
#   - this machine's extra CA bundle as the `ca_bundle` build secret, when pip is set to trust
#     one ($DOCKER_CA_BUNDLE, else $PIP_CERT, else pip's `global.cert`); none: no secret.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}

docker_cli=$(bash tools/docker_engine.sh start)

ca=${DOCKER_CA_BUNDLE:-${PIP_CERT:-}}
if [[ -z "$ca" ]]; then
  for py in .venv/bin/python python3; do
    if command -v "$py" >/dev/null; then
      ca=$("$py" -m pip config get global.cert 2>/dev/null) || ca=""
      break
    fi
  done
fi
secret=()
if [[ -n "$ca" && -s "$ca" ]]; then
  echo "build: CA bundle $ca given to the build as secret ca_bundle" >&2
  secret=(--secret "id=ca_bundle,src=$ca")
fi

set -x
DOCKER_BUILDKIT=1 "$docker_cli" build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  "${secret[@]}" -f docker/Dockerfile "$@" .
