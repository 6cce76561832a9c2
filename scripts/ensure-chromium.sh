#!/usr/bin/env bash
# ensure-chromium.sh - make sure a headless Chromium is installed for the status page's
# browser test (cmd/tandem TestStatusPageInBrowser); install Debian's package when missing.
# Idempotent: does nothing when chromium is present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [[ $(id -u) != 0 ]]; then
  SUDO=sudo
fi
echo "ensure-chromium: installing Debian's chromium for the browser test" >&2
$SUDO apt-get update -qq >/dev/null || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null 2>&1
