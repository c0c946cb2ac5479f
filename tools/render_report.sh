#!/usr/bin/env bash
# Screenshot a flipsafe HTML report in headless Chromium, to check that it renders offline.
# Usage: tools/render_report.sh REPORT.html [OUT.png] [WIDTHxHEIGHT]
# Needs the Debian package `chromium` (apt-get install -y chromium).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT (default 1280x4000)]" >&2
    exit 2
fi
report=$1
out=${2:-${report%.html}.png}
size=${3:-1280x4000}

if [ ! -f "$report" ]; then
    echo "error: $report does not exist; write one with flipsafe report DIR --out $report" >&2
    exit 2
fi
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "error: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(realpath "$report")"
out=$(realpath -m "$out")
# The flags keep Chromium from reaching the network, so a report that needs it shows gaps.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --screenshot="$out" \
    --window-size="${size/x/,}" "$url" 2>"$profile/chromium.log" || {
    cat "$profile/chromium.log" >&2
    exit 1
}
if [ ! -s "$out" ]; then
    cat "$profile/chromium.log" >&2
    echo "error: chromium wrote no screenshot" >&2
    exit 1
fi
echo "$out"
