#!/usr/bin/env bash
# `just release VERSION`: the image and the YAML a cluster applies, as upstream ships a release.
#
#   REGISTRY=ghcr.io/acme just release 1.0.0
#
# With a container runtime (docker with buildx and a running daemon), it builds the activator
# image for PLATFORMS (default linux/amd64,linux/arm64), pushes it to REGISTRY, and exports the
# binaries' debug symbols (the image's binaries are stripped) into the output directory. Without
# one, it renders the YAML for an image built elsewhere: IMAGE names it by digest.
#
# Writes to RELEASE_DIR (default target/release-VERSION):
#   affinity-activator.yaml        the activator's Deployment, HPA, PDB and RBAC, over an
#                                  existing knative-serving; nothing else of it is touched
#   affinity-activator-redis.yaml  the Redis its replicas share their pins through
#   symbols/                       debug symbols of the image's binaries (with a runtime)
# Every image in both files is pinned by digest (REDIS_IMAGE names Redis's when there is no
# runtime to look it up).
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 1
}

version=${1:-}
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
    fail "give the release a semantic version, such as 1.2.0 or 1.2.0-rc.1 (got '${version}')"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${RELEASE_DIR:-$root/target/release-$version}
mkdir -p "$out"
command -v kubectl >/dev/null || fail "kubectl (with its built-in kustomize) renders the YAML; \`just deps\` installs it"

pinned() {
    [[ $1 =~ ^[^[:space:]@]+@sha256:[0-9a-f]{64}$ ]]
}

runtime() {
    docker buildx version >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

image=${IMAGE:-}
if [[ -z $image ]]; then
    runtime || fail "no container runtime here (docker with buildx and a running daemon) to build the image: build and push it elsewhere, then set IMAGE=REGISTRY/affinity-activator:$version@sha256:<digest> to render the YAML"
    [[ -n ${REGISTRY:-} ]] || fail "REGISTRY names where the image is pushed, such as ghcr.io/acme"
    docker buildx build --platform "${PLATFORMS:-linux/amd64,linux/arm64}" --target activator \
        --tag "$REGISTRY/affinity-activator:$version" --metadata-file "$out/image.json" --push "$root"
    digest=$(sed -n 's/.*"containerimage.digest": *"\(sha256:[0-9a-f]*\)".*/\1/p' "$out/image.json")
    image="$REGISTRY/affinity-activator:$version@$digest"
    docker buildx build --target symbols --output "type=local,dest=$out/symbols" "$root"
fi
pinned "$image" || fail "IMAGE must name the image by digest (REGISTRY/affinity-activator:TAG@sha256:<64 hex digits>), not '$image'"

redis_image=${REDIS_IMAGE:-}
if [[ -z $redis_image ]]; then
    stock=$(sed -n 's/^ *image: *//p' "$root/manifests/redis/redis.yaml")
    runtime || fail "no container runtime here to look up the digest of $stock: set REDIS_IMAGE=$stock@sha256:<digest>"
    digest=$(docker buildx imagetools inspect "$stock" --format '{{json .Manifest.Digest}}' | tr -d '"')
    redis_image="$stock@$digest"
fi
pinned "$redis_image" || fail "REDIS_IMAGE must name the image by digest (…@sha256:<64 hex digits>), not '$redis_image'"

# Renders `dir` with the image `name` replaced by `reference` and the release's version label.
render() {
    local dir=$1 name=$2 reference=$3 scratch
    scratch=$(mktemp -d "$out/.render.XXXXXX")
    cat >"$scratch/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$scratch" "$dir")
images:
  - name: $name
    newName: ${reference%@*}
    digest: ${reference#*@}
labels:
  - pairs:
      app.kubernetes.io/version: "$version"
    includeSelectors: false
    includeTemplates: true
YAML
    kubectl kustomize --load-restrictor LoadRestrictionsNone "$scratch"
    rm -r "$scratch"
}

{
    echo "# affinity-activator $version: the activator of an existing knative-serving (see README.md for"
    echo "# the versions it applies over). kubectl apply -f affinity-activator.yaml"
    render "$root/manifests/release" affinity-activator "${image%%:*}@${image#*@}"
} >"$out/affinity-activator.yaml"
{
    echo "# affinity-activator $version: the Redis the activator replicas share their pins through."
    echo "# Create the Secret affinity-activator-redis first (README.md). kubectl apply -f affinity-activator-redis.yaml"
    render "$root/manifests/redis" "${redis_image%%[:@]*}" "${redis_image%%[:@]*}@${redis_image#*@}"
} >"$out/affinity-activator-redis.yaml"
echo "release $version: $out/affinity-activator.yaml, $out/affinity-activator-redis.yaml (image $image)"
