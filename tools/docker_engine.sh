#!/usr/bin/env bash
# Make a Docker engine answer and the base image local/debian:bookworm exist, on a machine that
# reaches the Debian and Python package registries but no image registry (see docker/README.md).
# Used by docker/build.sh (so by `make docker`) and tests/test_docker.py.
#
#   tools/docker_engine.sh [start]   idempotent; prints on stdout the docker client to build with
#   tools/docker_engine.sh stop      stops the dockerd that `start` launched, and nothing else
#
# `start`, each step only when needed: apt-get install docker.io (when there is no engine at all);
# start dockerd in the background (log and pidfile in $STATE); debootstrap a minimal Debian
# bookworm and import it as local/debian:bookworm (the root filesystem tarball is cached in
# $STATE, so a new engine only re-imports it). Without root, a pulled debian:bookworm-slim is
# tagged instead. A second `start` with all of that in place takes well under a second.
#
# The Dockerfile needs BuildKit (its CA bundle comes in as a build secret). Docker 23+ clients
# build with it through the buildx plugin; Debian's 20.10 client through DOCKER_BUILDKIT=1 and the
# engine's own BuildKit. The client printed is one of those, so callers run
#   DOCKER_BUILDKIT=1 "$(tools/docker_engine.sh)" build ...
# Exit status 3, with the reason on stderr, when no engine can be had (no root, dockerd fails).
set -euo pipefail

STATE=${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}/docker
BASE_TAG=${BASE_TAG:-local/debian:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS_TAR="$STATE/debian-bookworm-minbase.tar"
PIDFILE="$STATE/dockerd.pid"
LOG="$STATE/dockerd.log"

say() { echo "docker_engine: $*" >&2; }
fail() {
  say "$*"
  exit 3
}

# The pid of the dockerd this script started, if it is still that dockerd.
our_dockerd() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid=$(<"$PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 1
  echo "$pid"
}

# SIGTERM to the dockerd with this pid, and wait until it has gone.
terminate() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  # dockerd stops its containers and its own containerd first; give it the time it asks for.
  for _ in $(seq 60); do
    [[ -d "/proc/$pid" ]] || return 0
    sleep 0.5
  done
  fail "dockerd (pid $pid) did not stop within 30 s; log: $LOG"
}

stop() {
  local pid
  if ! pid=$(our_dockerd); then
    rm -f "$PIDFILE"
    say "no dockerd started by this script is running; nothing to stop"
    return 0
  fi
  terminate "$pid"
  rm -f "$PIDFILE"
  say "stopped dockerd (pid $pid)"
}

# The first docker client that builds with BuildKit: buildx plugin, or a pre-23 client.
pick_client() {
  local c major
  for c in $(type -ap docker) /usr/bin/docker; do
    [[ -x "$c" ]] || continue
    if "$c" buildx version >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
    major=$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
    if [[ -n "$major" ]] && ((major < 23)); then
      echo "$c"
      return 0
    fi
  done
  return 1
}

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    fail "'$*' needs root (no passwordless sudo either); start a Docker engine yourself"
  fi
}

# apt-get install, quietly (the log is shown when it fails).
apt_install() {
  command -v apt-get >/dev/null || fail "no apt-get to install $*; install it yourself"
  say "installing $* with apt-get"
  mkdir -p "$STATE"
  if ! { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root \
    apt-get install -y -qq --no-install-recommends "$@"; } >"$STATE/apt.log" 2>&1; then
    tail -n 20 "$STATE/apt.log" >&2
    fail "apt-get install $* failed (log above)"
  fi
}

ensure_engine() {
  local client=$1 pid
  "$client" info >/dev/null 2>&1 && return 0
  ((EUID == 0)) || fail "no Docker engine answers and starting dockerd needs root"
  mkdir -p "$STATE"
  say "starting dockerd (log: $LOG)"
  # setsid: the engine outlives this script and the caller's process group, until `stop`.
  setsid dockerd >"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  for _ in $(seq 120); do
    if "$client" info >/dev/null 2>&1; then
      say "dockerd is up (pid $pid)"
      return 0
    fi
    [[ -d "/proc/$pid" ]] || break
    sleep 0.5
  done
  tail -n 20 "$LOG" >&2 || true
  terminate "$pid"
  rm -f "$PIDFILE"
  fail "dockerd did not come up (log above, full log: $LOG)"
}

# debootstrap a minimal bookworm into $ROOTFS_TAR.
make_rootfs() {
  local work
  command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || apt_install debootstrap
  work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand $work now: it is local
  trap "rm -rf '$work'" EXIT
  say "debootstrap Debian bookworm (minbase) from $DEBIAN_MIRROR, about a minute"
  if ! PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase bookworm "$work/rootfs" \
    "$DEBIAN_MIRROR" >"$work/log" 2>&1; then
    tail -n 20 "$work/log" >&2
    fail "debootstrap failed (log above)"
  fi
  # The same suites as the official debian:bookworm image, and no downloaded .debs.
  printf 'deb %s %s main\n' "$DEBIAN_MIRROR" bookworm "$DEBIAN_MIRROR" bookworm-updates \
    "${DEBIAN_MIRROR%/debian}/debian-security" bookworm-security \
    >"$work/rootfs/etc/apt/sources.list"
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  mkdir -p "$STATE"
  tar -C "$work/rootfs" -cf "$ROOTFS_TAR.partial" .
  mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
  rm -rf "$work"
  trap - EXIT
}

ensure_base_image() {
  local client=$1
  "$client" image inspect "$BASE_TAG" >/dev/null 2>&1 && return 0
  if [[ ! -s "$ROOTFS_TAR" ]] && ((EUID != 0)); then
    # No root for debootstrap: a registry's Debian will do, where one is reachable.
    say "no root for debootstrap; trying to pull debian:bookworm-slim as $BASE_TAG"
    if timeout 300 "$client" pull -q debian:bookworm-slim >&2; then
      "$client" tag debian:bookworm-slim "$BASE_TAG"
      return 0
    fi
    fail "cannot make $BASE_TAG: debootstrap needs root and debian:bookworm-slim did not pull"
  fi
  [[ -s "$ROOTFS_TAR" ]] || make_rootfs
  say "importing $ROOTFS_TAR as $BASE_TAG"
  "$client" import --change 'CMD ["bash"]' "$ROOTFS_TAR" "$BASE_TAG" >/dev/null
}

start() {
  local client
  # Debian's engine, only when there is none: docker.io would fight an installed docker-ce.
  command -v dockerd >/dev/null || pick_client >/dev/null || apt_install docker.io
  client=$(pick_client) || fail "no docker client that builds with BuildKit: install the buildx" \
    "plugin (docker-buildx-plugin) or Debian's docker.io"
  ensure_engine "$client"
  ensure_base_image "$client"
  echo "$client"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
