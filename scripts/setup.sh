#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test this workspace.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The emulated-host smoke test creates namespaces, veth links and tbf qdiscs.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
# The registry-mirror tests run CNCF distribution, skopeo and containerd (and htpasswd for a
# registry with basic auth).
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
fi
# Object storage and model hub tests: moto's S3 server, boto3 (to fill it), the Hugging Face
# client, and s3s-fs (an S3 server that enforces auth; 0.14.1 builds with this toolchain).
if ! python3 -c 'import moto, boto3, huggingface_hub' >/dev/null 2>&1; then
  python3 -m pip install --quiet 'moto[server]' boto3 huggingface_hub
fi
if ! command -v s3s-fs >/dev/null 2>&1; then
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
