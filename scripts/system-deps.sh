#!/usr/bin/env bash
# Install the system packages finpulse runs with, from Debian's archive, when they are missing:
#   required: Java 17+ and Maven (the local Kafka broker and its jars)
#   alerting: Prometheus and Alertmanager (the demo's alerts and the alerting tests; the demo goes on without)
#   catalog:  PostgreSQL (the lake's catalog for writers on several hosts; the tests start a throwaway server)
# Their packaged services need systemd and stay down: finpulse starts the binaries itself on loopback ports.
set -euo pipefail

required=()
command -v java >/dev/null || required+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || required+=(maven)
alerting=()
[[ -x /usr/bin/prometheus ]] || command -v prometheus >/dev/null || alerting+=(prometheus)
[[ -x /usr/bin/prometheus-alertmanager ]] || command -v alertmanager >/dev/null || alerting+=(prometheus-alertmanager)

# The server binaries (initdb, pg_ctl) live under /usr/lib/postgresql/<version>/bin, not on PATH.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || alerting+=(postgresql)

missing=("${required[@]}" "${alerting[@]}")
((${#missing[@]})) || exit 0

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    exit 0
fi

echo "finpulse needs: sudo apt-get install ${missing[*]}" >&2
# Without Java and Maven nothing runs; without Prometheus the demo runs without alerts.
((${#required[@]} == 0))
