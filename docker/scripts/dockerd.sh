#!/usr/bin/env bash
# Start or stop a Docker engine of our own, for building the images and the smoke stack.
#
#   docker/scripts/dockerd.sh start   # no-op when a daemon already answers `docker info`
#   docker/scripts/dockerd.sh stop    # stops only a daemon this script started
#   docker/scripts/dockerd.sh status
#
# Hosts without systemd (CI runners, build containers): dockerd runs in the background with
# its data and exec roots in a folder of its own. docker.io and mmdebstrap are installed
# from Debian when missing (root only). CELLPIPE_DOCKER_ROOT moves that folder.
set -euo pipefail

ROOT=${CELLPIPE_DOCKER_ROOT:-/var/lib/cellpipe-docker}
PIDFILE=$ROOT/dockerd.pid
LOG=$ROOT/dockerd.log
# The socket dockerd and the docker client use when DOCKER_HOST is not set.
SOCKET=/var/run/docker.sock

answers() { timeout 10 docker info >/dev/null 2>&1; }

install_tools() {
    if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null \
        && command -v docker >/dev/null; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "dockerd.sh: docker.io and mmdebstrap are missing; install them as root" >&2
        exit 1
    fi
    echo "dockerd.sh: installing docker.io and mmdebstrap from Debian" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >/dev/null
}

start() {
    install_tools
    if answers; then
        echo "dockerd.sh: a Docker engine already answers; leaving it alone"
        return
    fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "dockerd.sh: dockerd (pid $(cat "$PIDFILE")) runs but does not answer; see $LOG" >&2
        exit 1
    fi
    mkdir -p "$ROOT/data" "$ROOT/exec"
    # setsid: the daemon must outlive the shell (and the make or pytest) that started it.
    setsid dockerd \
        --data-root "$ROOT/data" --exec-root "$ROOT/exec" --pidfile "$PIDFILE" \
        --storage-driver overlay2 --host "unix://$SOCKET" \
        >>"$LOG" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        if answers; then
            echo "dockerd.sh: dockerd started (pid $(cat "$PIDFILE"), root $ROOT)"
            return
        fi
        sleep 0.5
    done
    echo "dockerd.sh: dockerd did not answer within 60 s; last log lines:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
}

stop() {
    if [ ! -f "$PIDFILE" ]; then
        echo "dockerd.sh: no dockerd started by this script"
        return
    fi
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "dockerd.sh: dockerd (pid $pid) ignored SIGTERM for 30 s; killing it" >&2
            kill -KILL "$pid"
        fi
    fi
    rm -f "$PIDFILE"
    echo "dockerd.sh: dockerd (pid $pid) stopped"
}

status() {
    if answers; then
        echo "running"
    else
        echo "stopped"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
