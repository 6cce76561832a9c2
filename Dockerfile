# Multi-stage build. cgo stays on: the statement classifier (pg_query, from the
# dual-write work on) is cgo, so the runtime image is glibc-based.
# The Go toolchain is pinned to the exact release the module is tested with;
# GOTOOLCHAIN=local keeps 'go' from fetching another one during the build.
FROM golang:1.26.8-bookworm AS build
ENV GOTOOLCHAIN=local
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.release=${VERSION}" -o /out/tandem ./cmd/tandem

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent tandem
COPY --from=build /out/tandem /usr/local/bin/tandem
USER tandem
EXPOSE 6432 9187
# No config is baked in: mount yours and point TANDEM_CONFIG at it, or set
# TANDEM_* variables. Both ports listen on loopback until you say otherwise:
# to publish them, set TANDEM_LISTEN=0.0.0.0:6432 together with SCRAM client
# auth (trust off loopback is refused), and TANDEM_ADMIN=0.0.0.0:9187 together
# with TANDEM_ADMIN_API_TOKEN_FILE (an admin API without a token off loopback
# is refused). See README, Security.
ENV TANDEM_LISTEN=127.0.0.1:6432 TANDEM_ADMIN=127.0.0.1:9187
# The slim image has no curl: the binary asks its own admin API, with the same
# configuration (address, TLS, token) as the proxy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["/usr/local/bin/tandem", "health", "--timeout", "4s"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tandem"]
CMD ["proxy"]
