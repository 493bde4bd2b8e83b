# syntax=docker/dockerfile:1
# The `handoff` binary: the Flight server (`serve`, the default) and the DataLink controller
# (`controller`). Build: docker build -t ghcr.io/handoff-dev/handoff:0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
# No protoc: the protobuf code is generated ahead of time and checked in (crates/handoff-proto/src/gen).
# The C parts (mimalloc, zstd, ring) build with the image's gcc.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
# handoff-server's bench targets live here and `handoff bench` embeds flight_bench.py.
COPY benches benches
# The `dist` profile, as the Python wheel: no debuginfo (symbols stay, so backtraces still name
# functions) and no whole-program LTO, which halves a cold build (docs/benchmarks.md).
# target/ is a cache mount, gone after this step, so the binary is copied out in the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p handoff-cli \
 && cp target/dist/handoff /usr/local/bin/handoff

# glibc and libgcc are all the binary links against; rustls needs no OpenSSL. The image brings CA
# certificates (for S3/GCS/Azure spill over TLS) and no shell.
# The tests build the same contents another way, with no registry or Docker engine: the binary and
# the libraries it links on a scratch image, user 65532 (scripts/images.sh, for the single-node
# cluster of tests/python/test_cluster.py).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/handoff /usr/local/bin/handoff
USER 65532:65532
# Flight (gRPC) and the server's /healthz, /readyz, /metrics. `serve` binds 127.0.0.1 by default:
# in a pod pass --listen 0.0.0.0:8815 --http-listen 0.0.0.0:8816, as the controller does.
EXPOSE 8815 8816
ENTRYPOINT ["/usr/local/bin/handoff"]
CMD ["serve"]
