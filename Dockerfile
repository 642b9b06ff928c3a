# syntax=docker/dockerfile:1
#
# The activator image (the default target, `knative` mode; it also carries autoscaler-shim) and
# the demo-service image (`--target demo`). Built natively for the platform asked for:
#   docker build -t affinity-activator:dev .
#   docker build --target demo -t dev.local/affinity-demo:dev .   (the name manifests/demo uses)
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/affinity-activator:TAG --push .
#   REGISTRY=… just release VERSION   (the above, the symbols, and the release YAML pinned by digest)
# (another platform than the builder's runs the Rust build under QEMU: slow, but the same build).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# protoc comes from a crate; the build needs nothing beyond the Rust image. The release profile
# keeps debug info for profiling (`debug = 1`): the image gets the binaries stripped (about a
# sixth of the size), and their symbols go to the `symbols` target, linked by build id and
# .gnu_debuglink, for perf and gdb to find.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p activator -p autoscaler-shim -p demo-service \
    && mkdir -p /out /symbols \
    && for bin in activator autoscaler-shim demo-service; do \
         objcopy --only-keep-debug "target/release/$bin" "/symbols/$bin.debug" \
         && objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="/symbols/$bin.debug" "target/release/$bin" "/out/$bin"; \
       done

# Debug symbols of the image's binaries: `docker buildx build --target symbols --output type=local,dest=DIR .`
FROM scratch AS symbols
COPY --from=build /symbols /

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
