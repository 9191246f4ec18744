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
