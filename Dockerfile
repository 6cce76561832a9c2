# Multi-stage build. cgo stays on: the statement classifier (pg_query, from the
# dual-write work on) is cgo, so the runtime image is glibc-based.
FROM golang:1.26-bookworm AS build
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
COPY deploy/tandem.example.yaml /etc/tandem/tandem.yaml
USER tandem
EXPOSE 6432 9187
# Listen on all interfaces inside the container; publish the ports you need.
ENV TANDEM_LISTEN=0.0.0.0:6432 TANDEM_ADMIN=0.0.0.0:9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tandem"]
CMD ["proxy", "-c", "/etc/tandem/tandem.yaml"]
