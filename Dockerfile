# syntax=docker/dockerfile:1
# One image with every evgrid binary: evgrid-ingest, evgrid-dispatcher, evgrid-substation and the
# evgrid command line. docker-compose.yml runs each service of the pipeline from it
# (ingest → dispatcher → substations); docs/deploy.md says how.
#
#   chef     the pinned Rust toolchain plus cargo-chef (from crates.io)
#   planner  reduces the workspace to a recipe: manifests, lock file, target skeleton
#   builder  cooks the dependencies from the recipe (a layer that survives source edits),
#            then builds the workspace in release mode
#   runtime  Debian slim, non-root, the four binaries and curl for the health checks

# Same toolchain as development and CI; bookworm so the binaries match the runtime's glibc.
FROM rust:1.95.0-bookworm AS chef
# cargo-chef derives the dependency-only skeleton from the manifests themselves (targets,
# examples, benches, build scripts), so the cached layer stays right as crates grow, where
# hand-made dummy sources drift.
RUN cargo install cargo-chef --version 0.1.78 --locked
# No debug info in the image: the workspace's release profile keeps line tables, which make each
# binary about 5 times larger. Stripped at link time, so the code compiled is exactly what a
# local `cargo build --release` compiles; symbols stay, so a backtrace still names its functions.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The packages with binaries; --bins leaves tests, benches and examples out.
ARG PACKAGES="-p evgrid-ingest -p evgrid-dispatcher -p evgrid-substation -p evgrid"
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bins $PACKAGES --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins $PACKAGES

FROM debian:bookworm-slim AS runtime
# curl probes /readyz in the compose health checks; ca-certificates serves tls:// NATS URLs.
# Versions come with the pinned Debian release; exact package pins would break with each of its
# security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 evgrid \
    && useradd --system --uid 10001 --gid evgrid --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin evgrid
COPY --from=builder \
    /src/target/release/evgrid-ingest \
    /src/target/release/evgrid-dispatcher \
    /src/target/release/evgrid-substation \
    /src/target/release/evgrid \
    /usr/local/bin/
# Where `evgrid secrets` writes in docker compose: a new named volume mounted here starts as
# this directory, owned by the service user and private to it.
RUN mkdir /secrets && chown 10001:10001 /secrets && chmod 0700 /secrets
USER 10001:10001
# Each service takes its settings from the environment (NATS_URL, EVGRID_LISTEN, ...; see each
# binary's --help); compose chooses the binary with `command`.
CMD ["evgrid", "--help"]
