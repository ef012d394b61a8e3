#!/usr/bin/env bash
# Checks a built ctguard .deb without installing it on this host: its file list and
# control data, then an unpack by dpkg itself into a scratch root (`dpkg --root --unpack`
# runs no maintainer script: there is no preinst), and the unpacked binary and policy.
# Usage: packaging/check-deb.sh [path/to/ctguard_*.deb]   (default: the newest one built)
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-}
if [ -z "$deb" ]; then
  target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
    grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
  deb=$(ls -t "$target_dir"/debian/ctguard_*.deb 2>/dev/null | head -n1 || true)
fi
[ -f "$deb" ] || { echo "check-deb: no .deb found (build one with cargo deb)" >&2; exit 1; }

failures=0
fail() { echo "check-deb: $*" >&2; failures=$((failures + 1)); }

# 1. Contents: every file the packaging promises, with its mode.
listing=$(dpkg-deb -c "$deb")
expect() { # mode path
  grep -qE "^$1 .* \./$2\$" <<<"$listing" || fail "missing $2 (mode $1)"
}
expect -rwxr-xr-x usr/bin/ctguard
expect -rw-r--r-- etc/ctguard/policy.toml
expect -rw-r--r-- usr/lib/systemd/system/ctguard.service
expect -rw-r--r-- usr/share/man/man8/ctguard.8.gz
expect -rw-r--r-- usr/share/man/man8/ctguard-run.8.gz
expect -rw-r--r-- usr/share/bash-completion/completions/ctguard
expect -rw-r--r-- usr/share/zsh/vendor-completions/_ctguard
expect -rw-r--r-- usr/share/fish/vendor_completions.d/ctguard.fish
expect -rw-r--r-- usr/share/ctguard/prometheus/alerts.yml
expect -rw-r--r-- usr/share/ctguard/policies/default.toml
expect -rw-r--r-- usr/share/doc/ctguard/LICENSE-MIT
expect -rw-r--r-- usr/share/doc/ctguard/LICENSE-APACHE

# 2. Control data: the policy is a conffile; the unit is handled by the maintainer scripts.
ctrl=$(mktemp -d)
root=$(mktemp -d)
trap 'rm -rf "$ctrl" "$root"' EXIT
dpkg-deb -e "$deb" "$ctrl"
grep -qx /etc/ctguard/policy.toml "$ctrl/conffiles" || fail "policy.toml is not a conffile"
grep -q "daemon-reload" "$ctrl/postinst" || fail "postinst does not reload systemd"
grep -q "stop ctguard.service" "$ctrl/prerm" || fail "prerm does not stop the service"
[ "$(dpkg-deb -f "$deb" Package)" = ctguard ] || fail "package name"
dpkg-deb -f "$deb" Suggests | grep -q iptables || fail "iptables (the NOTRACK fallback) is not suggested"

# 3. dpkg unpacks it into a scratch root and registers it there.
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status"
dpkg --root="$root" --unpack "$deb" >/dev/null
dpkg --root="$root" -s ctguard | grep -q "^Status: install ok unpacked" || fail "dpkg did not register it"
dpkg --root="$root" -s ctguard | grep -q "/etc/ctguard/policy.toml" || fail "dpkg lists no conffile"
# A new conffile waits as .dpkg-new until `dpkg --configure` (which would run postinst,
# chrooted into a root that has no shell: not done here) moves it into place.
policy="$root/etc/ctguard/policy.toml.dpkg-new"
cmp -s "$policy" policies/default.toml || fail "policy.toml is not the default policy"

# 4. What was unpacked works: the binary runs, the shipped policy is valid, the unit
#    starts that binary with that policy, the man page is readable roff.
"$root/usr/bin/ctguard" --version | grep -q "^ctguard " || fail "ctguard --version"
"$root/usr/bin/ctguard" check "$policy" >/dev/null || fail "the shipped policy does not check"
grep -q "^ExecStart=/usr/bin/ctguard run --policy /etc/ctguard/policy.toml" \
  "$root/usr/lib/systemd/system/ctguard.service" || fail "unit ExecStart"
zcat "$root/usr/share/man/man8/ctguard-run.8.gz" | grep -q -- "metrics" || fail "man page of run lacks --metrics-listen"
bash -n "$root/usr/share/bash-completion/completions/ctguard" || fail "bash completion syntax"

if [ "$failures" -gt 0 ]; then
  echo "check-deb: $failures problem(s) in $deb" >&2
  exit 1
fi
echo "check-deb: $deb ok ($(grep -c . <<<"$listing") entries)"
