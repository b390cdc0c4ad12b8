#!/usr/bin/env bash
# spitwall: the one install script. make setup, CI and Vagrant all run it.
# Idempotent: installs only what is missing; never starts the distro services
# (the lab starts its own redis-server and kamailio on free loopback ports).
set -euo pipefail

PKGS=(
  kamailio kamailio-python3-modules   # the proxy and app_python3 (KEMI)
  kamailio-tls-modules                # tests: Kamailio as the TLS server delivery is tested on
  kamailio-redis-modules              # db_redis: the Redis dialog store (ops/dialogdb.py)
  redis-server                        # shared state
  sip-tester                          # SIPp: load and functional tests
  python3-venv python3-dev gcc        # the project venv, from Debian's /usr/bin/python3
  espeak-ng sox                       # greeting / test audio (phase 2)
  iproute2 procps                     # ip, ps, pkill for the lab
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "provision: all apt packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

echo "provision: installing ${missing[*]}"
# Keep Debian's postinst scripts from starting kamailio/redis on 5060/6379:
# the lab runs its own instances on ports it picks.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  added_policy=1
fi
trap '[ "$added_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "provision: done"
