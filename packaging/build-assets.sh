#!/usr/bin/env bash
# Builds the release binary (once) and generates what the packages ship besides it, from
# the binary's own clap definitions: man pages (section 8, gzipped) and bash, zsh and fish
# completions, into target/assets/. Then `cargo deb --no-build` or `cargo generate-rpm`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
# Cargo knows where its target dir is (CARGO_TARGET_DIR, .cargo/config): ask it.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
bin="$target_dir/release/ctguard"

out=target/assets
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" generate man --out-dir "$out/man" >/dev/null
# -n: no name or time stamp inside, so the same sources give the same package.
gzip -9nf "$out"/man/*.8
for shell in bash zsh fish; do
  "$bin" generate completions "$shell" --out-dir "$out/completions" >/dev/null
done
echo "assets in $out: $(find "$out" -type f | wc -l) files"
