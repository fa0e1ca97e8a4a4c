# syntax=docker/dockerfile:1
#
# The cdrguard image: `docker build -t cdrguard .` from the repository's root.
# One binary for every command (run, topics, produce, keys, ...); the entrypoint is
# cdrguard, so `docker run cdrguard run --config FILE` runs the stream processor.

# The build and the runtime share one Debian release, so the binary finds the same
# glibc and OpenSSL it was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# rdkafka-sys compiles librdkafka (C, plus its C++ wrapper) from its bundled sources with
# librdkafka's own configure script and make: the crate's cmake-build feature is off, so
# no cmake. OpenSSL and zlib are linked from the system, found with pkg-config; zstd-sys
# builds zstd from source and links it statically.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src/ src/
# The shipped policies are compiled in (include_str!), and Cargo.toml names the benches,
# whose files cargo wants present even when only the binary is built.
COPY policies/ policies/
COPY benches/ benches/
# The caches keep the registry and compiled dependencies between builds (BuildKit); the
# binary is copied out of the cached target folder because that folder is not part of
# the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cdrguard \
 && install -D -m 0755 target/release/cdrguard /out/cdrguard

FROM debian:${DEBIAN_RELEASE}-slim
# Runtime needs of the binary beyond glibc: libssl3 (TLS to brokers) and zlib1g (already
# in the base), and CA certificates for brokers with public certificates.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid, so Kubernetes can check runAsNonRoot against the image and
# fsGroup/runAsUser can name it. /var/lib/cdrguard is its working folder (demo writes
# ./out); keys/ is where docker-compose's key volume is mounted: a new named volume takes
# this folder's owner and mode, so the key written there stays the user's alone.
RUN groupadd --system --gid 10001 cdrguard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/cdrguard \
        --shell /usr/sbin/nologin cdrguard \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/cdrguard \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/cdrguard/keys
COPY --from=build /out/cdrguard /usr/local/bin/cdrguard
# The policies as files too, so a configuration can name one (an operator's own policy is
# mounted instead); the annotated settings file resolves its default policy path
# (../policies/excedo.toml) against its own folder, i.e. to the copy below.
COPY policies/ /usr/share/cdrguard/policies/
COPY deploy/cdrguard.toml /usr/share/cdrguard/cdrguard.toml
USER 10001:10001
WORKDIR /var/lib/cdrguard
# Telemetry: /metrics, /healthz, /readyz (telemetry.listen, default 0.0.0.0:9464).
EXPOSE 9464
# No HEALTHCHECK: the same image runs one-shot commands (topics, produce, keys) that a
# health check would mark unhealthy; docker-compose.yml and the Kubernetes probes check
# `run` where it runs.
ENTRYPOINT ["cdrguard"]
CMD ["--help"]
