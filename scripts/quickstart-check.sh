#!/usr/bin/env bash
# Runs the README's Quickstart block exactly as written, on a fresh clone of this repository's HEAD
# (committed files only, as a new user gets them). Needs git, Node 20+ and the npm registry.
# Called by .ci/run; locally: scripts/quickstart-check.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/mxt-quickstart-XXXXXX")"
trap 'rm -rf "$work"' EXIT

git -c safe.directory="*" clone --quiet "$repo" "$work/mxtunnel"
cd "$work/mxtunnel"

# The first ```sh block under "## Quickstart".
awk '/^## /{q=($0=="## Quickstart")} q&&/^```sh$/{b=1;next} b&&/^```$/{exit} b{print}' README.md >"$work/quickstart.sh"
if [ ! -s "$work/quickstart.sh" ]; then
  echo "quickstart-check: no \`\`\`sh block under \"## Quickstart\" in README.md" >&2
  exit 1
fi
echo "quickstart-check: running on a fresh clone in $work/mxtunnel:"
sed 's/^/  | /' "$work/quickstart.sh"

started=$(date +%s)
bash -euo pipefail -x "$work/quickstart.sh" 2>&1 | tee "$work/output.txt"
# The demo's last proof: the mailbox saw the client's own address through the tunnel.
grep -q "the real client IP" "$work/output.txt" || {
  echo "quickstart-check: the demo did not report the mail it passed through" >&2
  exit 1
}
echo "quickstart-check: OK in $(($(date +%s) - started)) s"
