# Shared set-up steps for scripts/dev and scripts/test (sourced, not run).

setup_python() {
  local extras="${1:-}"
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
  fi
  local stamp=".venv/.echo-installed${extras:+-$extras}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing Echo${extras:+ with [$extras]} into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
    touch "$stamp"
  fi
}

setup_checkov() {
  # tests/test_aws.py runs the checkov policy scanner on the AWS template. It lives in a venv
  # of its own: its pins (packaging<24, boto3) conflict with the test environment's.
  if [ ! -x .venv-checkov/bin/checkov ]; then
    echo "==> installing checkov into .venv-checkov"
    python3 -m venv .venv-checkov
    .venv-checkov/bin/pip install --quiet --disable-pip-version-check "checkov>=3,<4"
  fi
}

setup_npm() {
  local dir="$1"
  if ! command -v npm >/dev/null; then
    echo "error: npm not found; install Node.js 18+ (e.g. apt-get install -y nodejs npm)" >&2
    return 1
  fi
  if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    echo "==> npm ci in $dir"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    touch "$dir/node_modules"
  fi
}

setup_browser() {
  # tests/test_browser_chat.py drives Debian's Chromium through Playwright; it never
  # downloads a browser of its own (no `playwright install`)
  if [ -x /usr/bin/chromium ]; then
    return 0
  fi
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing chromium (apt-get)"
    apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji
  else
    echo "note: /usr/bin/chromium is missing, so the browser test will be skipped;" \
      "install it with: sudo apt-get install -y chromium" >&2
  fi
}
