#!/usr/bin/env bash
# `make demo`: mount the bundled demo world, print what to try, unmount on Ctrl-C.
set -euo pipefail
drekifs=${DREKIFS:-drekifs}
mnt=${1:-/tmp/dreki}
data=${2:-/tmp/dreki-demo-data}

"$drekifs" mount --data-dir "$data" "$mnt"   # returns once the mount serves
trap '"$drekifs" umount "$mnt" && echo "unmounted $mnt"' EXIT
trap 'exit 0' INT TERM

cat <<TOUR

drekifs is serving the demo world at $mnt (as node1). Try, in another terminal:

  ls $mnt                                  # the world root: regions, global/, .dreki/
  find $mnt -maxdepth 5                    # regions and nodes, from the bundled zone
  cat $mnt/.dreki/world                    # the tree with friendly names and addresses
  ls $mnt/eu/fr/scw/dc2/node3              # a node: its global/ and local/ stores
  getfattr -n user.dreki.urn $mnt/eu/fr/scw/dc2/node3/local
  $drekifs urn $mnt/eu/fr/scw/dc2/node3/local/facts/cpu
  $drekifs path inf.random.sh:eu:fr:scw:dc2:node3::local::facts/cpu --mount $mnt
  $drekifs world --check                   # the demo world has no errors
  mkdir $mnt/eu/x                          # regions are read-only: EPERM

  echo hello > $mnt/global/motd            # a world-wide key (global store)
  mkdir -p $mnt/eu/fr/ovh/sbg1/node1/local/facts      # node1's own local store
  nproc > $mnt/eu/fr/ovh/sbg1/node1/local/facts/cpu
  getfattr -n user.dreki.version $mnt/global/motd
  $drekifs put inf.random.sh::global::motd "changed by URN"   # not through the mount...
  cat $mnt/global/motd                     # ...and the mount shows it at once
  cat $mnt/.dreki/stores                   # entries, bytes, changes, last write per store

Ctrl-C here (or: $drekifs umount $mnt) unmounts.
TOUR
sleep infinity &
wait
