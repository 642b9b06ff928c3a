# syntax=docker/dockerfile:1
#
# The activator image (the default target, `knative` mode; it also carries autoscaler-shim) and
# the demo-service image (`--target demo`). Built natively for the platform asked for:
#   docker build -t affinity-activator:dev .
#   docker build --target demo -t affinity-demo:dev .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/affinity-activator:TAG --push .
# (another platform than the builder's runs the Rust build under QEMU: slow, but the same build).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# protoc comes from a crate; the build needs nothing beyond the Rust image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p activator -p autoscaler-shim -p demo-service \
    && mkdir -p /out \
    && cp target/release/activator target/release/autoscaler-shim target/release/demo-service /out/

# A Knative Service's user container: listens on Knative's default port 8080, reports its pod
# (the host name) and revision (K_REVISION) in X-Demo-Pod and X-Demo-Revision.
FROM ${RUNTIME_IMAGE} AS demo
COPY --from=build /out/demo-service /demo-service
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/demo-service", "--listen", "0.0.0.0:8080"]

# The drop-in for knative-serving's activator: a numeric non-root user (the Deployment sets
# runAsNonRoot without a UID), nothing written to disk, logs on stderr.
FROM ${RUNTIME_IMAGE} AS activator
COPY --from=build /out/activator /out/autoscaler-shim /
USER 65532:65532
EXPOSE 8012 8013 9090
ENTRYPOINT ["/activator", "--mode", "knative"]
