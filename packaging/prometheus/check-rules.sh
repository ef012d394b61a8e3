#!/usr/bin/env bash
# Checks alerts.yml with promtool: syntax (`check rules`) and behaviour (`test rules` on
# alerts_test.yml). promtool is taken from Debian's prometheus package, unpacked into a
# scratch dir rather than installed, so no Prometheus server is set up on this machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  if ! (cd "$scratch" && apt-get download -qq prometheus 2>/dev/null); then
    apt-get update -qq
    (cd "$scratch" && apt-get download -qq prometheus)
  fi
  dpkg-deb -x "$scratch"/prometheus_*.deb "$scratch/root"
  promtool="$scratch/root/usr/bin/promtool"
fi

cd "$here"
"$promtool" check rules alerts.yml
"$promtool" test rules alerts_test.yml
