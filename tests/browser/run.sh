#!/usr/bin/env bash
# The local web console in a real browser: tests/browser/console.test.mjs drives Debian's
# Chromium with playwright-core (npm, pinned in package-lock.json) against the demo.
#   TWINBUS_BIN=target/release/twinbus bash tests/browser/run.sh
#   SCREENSHOTS_DIR=docs bash tests/browser/run.sh      # refresh the README's pictures
# Needs /usr/bin/chromium and mosquitto_pub (.ci/run installs both). node's test runner
# prints the summary; the test stops every process it starts, also on SIGTERM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export TWINBUS_BIN=${TWINBUS_BIN:-$(pwd)/../../target/release/twinbus}
[[ -x /usr/bin/chromium ]] || { echo "browser: /usr/bin/chromium is missing (apt-get install chromium)" >&2; exit 1; }
[[ -x $TWINBUS_BIN ]] || { echo "browser: no twinbus at $TWINBUS_BIN (cargo build --release)" >&2; exit 1; }
if [[ ! -f node_modules/playwright-core/package.json ]] ||
    ! grep -q "\"version\": \"$(sed -n 's/.*"playwright-core": "\(.*\)".*/\1/p' package.json)\"" node_modules/playwright-core/package.json; then
    echo "browser: installing playwright-core (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error
fi
# A TERM or INT (a `timeout` around this script) goes on to node, which stops the
# processes it started by their pids.
out=$(mktemp)
node --test --test-reporter=spec console.test.mjs > >(tee "$out") 2>&1 &
node_pid=$!
trap 'kill -TERM "$node_pid" 2>/dev/null; wait "$node_pid"' TERM INT
rc=0
wait "$node_pid" || rc=$?
trap - TERM INT
# node's summary (ℹ pass N / ℹ fail N) as the line .ci/run adds up.
passed=$(sed -n 's/^ℹ pass \([0-9]*\)$/\1/p' "$out" | tail -n 1)
failed=$(sed -n 's/^ℹ fail \([0-9]*\)$/\1/p' "$out" | tail -n 1)
rm -f "$out"
if ((rc != 0)) && [[ ${failed:-0} == 0 ]]; then failed=1; fi
echo "browser: ${passed:-0} passed, ${failed:-0} failed"
exit "$rc"
