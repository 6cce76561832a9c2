#!/usr/bin/env bash
# Start Tandem with the example config (edit the DSNs first). Ctrl-C or SIGTERM drains and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/tandem ./cmd/tandem
bin/tandem config check deploy/tandem.example.yaml
exec bin/tandem proxy -c deploy/tandem.example.yaml "$@"
