#!/usr/bin/env bash
# `make demo`: three peers of the bundled demo world on this machine (node1, node2, node3 of
# drekifs/data/demo.zone, on localhost ports 7101-7103), each mounted; prints a tour, and
# unmounts everything on Ctrl-C. With DEMO_CHECK=1 it runs the tour itself and exits (the test).
set -euo pipefail
drekifs=${DREKIFS:-drekifs}
base=${1:-/tmp/dreki}
data=${2:-/tmp/dreki-demo-data}
nodes=(node1 node2 node3)

mkdir -p "$data"
[ -e "$data/keyring" ] || "$drekifs" keygen "$data/keyring" >/dev/null
cleanup() {
    for n in "${nodes[@]}"; do
        "$drekifs" umount "$base/$n" 2>/dev/null && echo "unmounted $base/$n" || true
    done
}
trap cleanup EXIT
trap 'exit 0' INT TERM
for n in "${nodes[@]}"; do
    # Each returns once its mount serves; the bundled world is the default world.
    "$drekifs" mount --node "$n" --keyring "$data/keyring" --data-dir "$data/$n" "$base/$n"
done

n1=$base/node1 n2=$base/node2 n3=$base/node3
local1=eu/fr/ovh/sbg1/node1/local
tour=$(cat <<TOUR
  $drekifs status $n1                       # three peers, alive (give them a second)
  echo hello > $n1/global/motd              # written on node1...
  cat $n2/global/motd                       # ...read on node2 (the global store is replicated)
  echo 16 > $n1/$local1/cpus                # node1's own local store...
  cat $n2/$local1/cpus                      # ...read from node2 (node1 serves it)
  ls $n3/eu/fr/ovh/sbg1/node1/local         # and listed from node3
  kill -9 \$(cat $n3/.dreki/pid)             # node3's daemon dies...
  sleep 8; $drekifs status $n1              # ...node1 sees it suspect, then dead
  cat $n1/.dreki/members                    # the same, as a file
TOUR
)

if [ "${DEMO_CHECK:-0}" = 1 ]; then
    # The tour, run as printed, with its answers checked.
    for _ in $(seq 50); do
        [ "$(grep -c ' alive ' "$n1/.dreki/members")" = 3 ] && break
        sleep 0.2
    done
    "$drekifs" status "$n1"
    echo hello > "$n1/global/motd"
    for _ in $(seq 50); do [ -e "$n2/global/motd" ] && break; sleep 0.1; done
    [ "$(cat "$n2/global/motd")" = hello ]
    echo 16 > "$n1/$local1/cpus"
    [ "$(cat "$n2/$local1/cpus")" = 16 ]
    ls "$n3/eu/fr/ovh/sbg1/node1/local" | grep -qx cpus
    kill -9 "$(cat "$n3/.dreki/pid")"
    for _ in $(seq 100); do
        grep -q '^node3[^ ]* dead ' "$n1/.dreki/members" && break
        sleep 0.2
    done
    "$drekifs" status "$n1"
    grep -q '^node3[^ ]* dead ' "$n1/.dreki/members"
    echo "tour: all as printed"
    exit 0
fi

cat <<TOUR

drekifs is serving the demo world three times: $n1, $n2 and $n3 (nodes 1 to 3 of the bundled
zone, talking to each other on localhost). Try, in another terminal:

$tour

  ls $n1                                     # the world root: regions, global/, .dreki/
  cat $n1/.dreki/world                       # the tree with friendly names and addresses
  getfattr -n user.dreki.urn $n1/global/motd
  $drekifs get inf.random.sh::global::motd   # by URN, without a path

Ctrl-C here unmounts them all.
TOUR
sleep infinity &
wait
