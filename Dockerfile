# syntax=docker/dockerfile:1
# promguard's image: compiled in the official Rust image, run from distroless (glibc and
# libgcc, nothing else: no shell, no package manager) as an unprivileged user, ready for a
# read-only root filesystem. The only writable path it needs is the sale-mode state
# directory, /var/lib/promguard, which the Helm chart mounts.
#
#   docker build -t promguard:0.1.0 .
#   docker run --rm -p 9091:9091 promguard:0.1.0 \
#     serve --listen 0.0.0.0:9091 --recent-url http://prometheus:9090

# The toolchain the project is built and tested with; edition 2024 needs 1.85 or later.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target directories are BuildKit caches, so a rebuild recompiles only
# what changed; the binary is copied out of the cache for the next stage. --locked: the
# image gets exactly the dependencies in Cargo.lock that CI tested.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin promguard \
    && cp target/release/promguard /promguard

# Debian 12 like the build image, so the glibc the binary was linked against is there.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /promguard /usr/local/bin/promguard
# distroless' nonroot user; numeric, so runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
EXPOSE 9091
ENTRYPOINT ["/usr/local/bin/promguard"]
CMD ["serve", "--config", "/etc/promguard/promguard.yaml"]
