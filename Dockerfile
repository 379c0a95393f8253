# syntax=docker/dockerfile:1
# One image with both binaries: `bulkhead` (the control plane and CLI) and `bulkhead-proxy`
# (the sidecar, and `bulkhead-proxy init`, which injected pods run as their init container).
#
#   docker build -t ghcr.io/bulkhead/bulkhead:0.1.0 .
#
# Not built here (no container daemon where Bulkhead is tested); see docs/kubernetes.md.

# Build: the rust-version Cargo.toml declares, the lock file as committed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bulkhead-cli -p bulkhead-proxy --bins \
    && install -D -m 0755 target/release/bulkhead /out/bulkhead \
    && install -D -m 0755 target/release/bulkhead-proxy /out/bulkhead-proxy

# Run: Debian slim with what `bulkhead-proxy init` drives (iptables-restore and
# ip6tables-restore, or nft) and nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 bulkhead \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/bulkhead --no-create-home bulkhead \
    && install -d -o 65532 -g 65532 -m 0700 /var/lib/bulkhead
COPY --from=build /out/bulkhead /out/bulkhead-proxy /usr/local/bin/
# Not root. The control plane needs no privilege; the injected init container is given
# uid 0 with NET_ADMIN and NET_RAW only by its pod spec, and the sidecar runs as 1337.
USER 65532:65532
WORKDIR /var/lib/bulkhead
ENTRYPOINT ["/usr/local/bin/bulkhead"]
CMD ["--help"]
