# CI preparation for the Docker tests (sourced by scripts/test; not part of Echo itself).
#
# On CI machines with no registry access: as root, installs a Docker engine from Debian
# (docker.io, docker-compose, debootstrap) when none answers, starts dockerd in the
# background, and builds the base image echo-base:bookworm once with debootstrap (python3,
# redis-server, nginx and the CA certificates pip trusts here). Exports what the tests need:
# ECHO_TEST_BASE_IMAGE and the TESTCONTAINERS_* settings. Fast when everything is there.
# Never fails the caller: without an engine the Docker tests skip (or fail when CI=true).

ECHO_CI_BASE_IMAGE="${ECHO_CI_BASE_IMAGE:-echo-base:bookworm}"
ECHO_CI_DOCKERD_LOG="${ECHO_CI_DOCKERD_LOG:-/var/log/echo-ci-dockerd.log}"

_docker_ci_engine_up() {
  command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1
}

_docker_ci_apt() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> installing ${missing[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

_docker_ci_start_engine() {
  _docker_ci_engine_up && return 0
  echo "==> starting dockerd (log: $ECHO_CI_DOCKERD_LOG)"
  nohup dockerd >>"$ECHO_CI_DOCKERD_LOG" 2>&1 &
  local deadline=$((SECONDS + 60))
  until _docker_ci_engine_up; do
    if [ $SECONDS -ge $deadline ]; then
      echo "warning: dockerd did not answer within 60s; see $ECHO_CI_DOCKERD_LOG" >&2
      return 1
    fi
    sleep 1
  done
}

_docker_ci_pip_setting() {  # $1: env name, $2: pip config key
  local value="${!1:-}"
  [ -n "$value" ] || value="$(python3 -m pip config get "$2" 2>/dev/null || true)"
  printf '%s' "$value"
}

_docker_ci_debian_mirror() {  # the mirror this machine's apt already uses
  [ -n "${ECHO_CI_DEBIAN_MIRROR:-}" ] && { printf '%s' "$ECHO_CI_DEBIAN_MIRROR"; return; }
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ && $2 ~ /debian$/ {print $2; exit}'
  grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2; exit}'
}

_docker_ci_base_image() {
  docker image inspect "$ECHO_CI_BASE_IMAGE" >/dev/null 2>&1 && return 0
  echo "==> building $ECHO_CI_BASE_IMAGE with debootstrap (once, about a minute)"
  local root cert changes=()
  root="$(mktemp -d /tmp/echo-base.XXXXXX)"
  if ! debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,redis-server,nginx,ca-certificates \
      bookworm "$root/rootfs" "$(_docker_ci_debian_mirror | head -n 1)" \
      >"$root/debootstrap.log" 2>&1; then
    echo "warning: debootstrap failed; see $root/debootstrap.log" >&2
    return 1
  fi
  rm -f "$root"/rootfs/var/cache/apt/archives/*.deb
  # pip inside image builds trusts what pip trusts here (e.g. a TLS-inspecting proxy's CA)
  cert="$(_docker_ci_pip_setting PIP_CERT global.cert)"
  if [ -f "$cert" ]; then
    cat "$cert" >>"$root/rootfs/etc/ssl/certs/ca-certificates.crt"
    changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
  fi
  tar -C "$root/rootfs" -c . | docker import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "${changes[@]}" --change 'CMD ["/bin/bash"]' - "$ECHO_CI_BASE_IMAGE" >/dev/null
  local status=$?
  rm -rf "$root"
  return $status
}

docker_ci() {
  if ! _docker_ci_engine_up; then
    if [ "$(id -u)" != 0 ]; then
      echo "note: no Docker engine answers; the Docker tests will be skipped" >&2
      return 0
    fi
    _docker_ci_apt && _docker_ci_start_engine || return 0
  elif [ "$(id -u)" = 0 ] && ! command -v docker-compose >/dev/null; then
    _docker_ci_apt || true
  fi
  if ! docker image inspect "$ECHO_CI_BASE_IMAGE" >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { command -v debootstrap >/dev/null || _docker_ci_apt; } && _docker_ci_base_image || return 0
  fi
  if docker image inspect "$ECHO_CI_BASE_IMAGE" >/dev/null 2>&1; then
    export ECHO_TEST_BASE_IMAGE="$ECHO_CI_BASE_IMAGE"
  fi
  # image builds use the package index pip uses here (a file:// index cannot be reached)
  local index
  index="$(_docker_ci_pip_setting PIP_INDEX_URL global.index-url)"
  case "$index" in http://*|https://*) export PIP_INDEX_URL="$index" ;; esac
  export TESTCONTAINERS_RYUK_DISABLED=true TESTCONTAINERS_CONNECTION_MODE=docker_host
}

docker_ci
