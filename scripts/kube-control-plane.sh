#!/usr/bin/env bash
# Builds the real Kubernetes control plane the API tests run against
# (kube-apiserver and kube-controller-manager v1.20.2) from Debian bookworm's
# `kubernetes` source package, once per machine, and links it into this
# checkout at target/tools/kubernetes/bin. etcd comes from the `etcd-server`
# package (installed by bootstrap.sh). Called by scripts/bootstrap.sh; safe to
# run by hand (as root). A second run finds the cached binaries and takes
# well under a second.
#
# Why the cache lives outside the checkout: CI runs every job in a fresh clone
# on the same machine, and the cold build takes about 7 minutes on 2 cores and
# a 2.2 GB build tree. The two binaries (about 215 MB) are therefore kept in a
# machine-wide directory, $TLSMESH_KUBE_CACHE (default
# /var/cache/tlsmesh/kubernetes-v1.20.2), built only when missing, and every
# checkout points target/tools/kubernetes/bin at it. The build tree is removed
# after a successful build. To force a rebuild: rm -rf the cache directory.
#
# Why Debian's source package: no registry we can reach ships a prebuilt
# kube-apiserver (docs/KUBERNETES.md, "A real API server"); this one vendors
# all its Go dependencies, so the build needs no network (GOPROXY=off).
set -euo pipefail

say()  { printf '\033[1mkube-control-plane:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31mkube-control-plane: %s\033[0m\n' "$*" >&2; exit 1; }

KUBE_VERSION=v1.20.2
# Debian's version string for that release: 1.20.5+really1.20.2-…
DEBIAN_UPSTREAM='really1.20.2'
CACHE=${TLSMESH_KUBE_CACHE:-/var/cache/tlsmesh/kubernetes-$KUBE_VERSION}
BINS=(kube-apiserver kube-controller-manager)
# What a real node runs (`cargo xtask cluster`, docs/CLUSTER.md): built from the
# same tree after the control plane. Optional: a failure here is recorded in
# $CACHE/node-build.failed (with the log's tail) and does not fail the control
# plane, which the API tests need; `cargo xtask cluster up` reports it.
NODE_BINS=(kubelet kube-scheduler kube-proxy kubectl)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LINK="$REPO/target/tools/kubernetes/bin"

have_all() {
  local b
  for b in "${BINS[@]}"; do
    [[ -x "$CACHE/bin/$b" ]] || return 1
  done
  # The node binaries count as present once built, or once their build failed
  # (recorded, not retried on every bootstrap: rm the marker to retry).
  [[ -f "$CACHE/node-build.failed" ]] && return 0
  for b in "${NODE_BINS[@]}"; do
    [[ -x "$CACHE/bin/$b" ]] || return 1
  done
}

link_checkout() {
  mkdir -p "$(dirname "$LINK")"
  if [[ -L $LINK && $(readlink "$LINK") == "$CACHE/bin" ]]; then
    return
  fi
  rm -rf "$LINK"
  ln -s "$CACHE/bin" "$LINK" || die "cannot link $LINK -> $CACHE/bin"
}

if have_all; then
  link_checkout
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "building the control plane needs root (apt-get source, $CACHE). Re-run as root: sudo $0"
for tool in go make rsync jq dpkg-source apt-get flock; do
  command -v "$tool" >/dev/null \
    || die "no $tool on PATH; scripts/bootstrap.sh installs golang-go rsync jq dpkg-dev (run it first)"
done
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -f $REFLECT2/reflect2.go ]] \
  || die "no $REFLECT2: apt-get install golang-github-modern-go-reflect2-dev (bootstrap.sh does)"

mkdir -p "$CACHE" || die "cannot create $CACHE"
# One build per machine: two CI jobs bootstrapping at once wait for each other.
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"
if have_all; then
  link_checkout
  exit 0
fi

WORK="$CACHE/build"
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/parts" "$WORK/src"

# A private apt configuration with the machine's own Debian sources as deb-src
# (no host names are written here: they come from the machine's sources file).
SYS_SOURCES=/etc/apt/sources.list.d/debian.sources
[[ -f $SYS_SOURCES ]] || die "no $SYS_SOURCES to derive deb-src entries from; add a deb-src source for bookworm by hand"
sed -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb-src/' "$SYS_SOURCES" >"$WORK/apt/deb-src.sources"
grep -q '^Types: deb-src' "$WORK/apt/deb-src.sources" \
  || die "found no 'Types: deb' stanza in $SYS_SOURCES to turn into deb-src"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$WORK/apt/deb-src.sources"
  -o "Dir::Etc::SourceParts=$WORK/apt/parts"
  -o "Dir::State::Lists=$WORK/apt/lists"
  -o "Dir::Cache=$WORK/apt/cache"
)

t0=$SECONDS
say "fetching Debian's kubernetes source package (about 30 MB)"
apt-get "${APT_OPTS[@]}" update -qq \
  || die "apt-get update of the private deb-src list failed: check the network/proxy to the Debian mirror"
(cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source -qq kubernetes >"$WORK/apt-source.log" 2>&1) \
  || die "apt-get source kubernetes failed; see $WORK/apt-source.log"
shopt -s nullglob
trees=("$WORK"/src/kubernetes-*/)
shopt -u nullglob
((${#trees[@]} == 1)) || die "expected one unpacked kubernetes-* tree under $WORK/src, found ${#trees[@]}"
TREE=${trees[0]%/}
[[ $TREE == *"$DEBIAN_UPSTREAM"* ]] \
  || die "Debian's kubernetes source is $(basename "$TREE"), not $KUBE_VERSION ($DEBIAN_UPSTREAM); update KUBE_VERSION in $0 and the supported versions in docs/KUBERNETES.md"

# Go 1.19 with the vendored reflect2 v1.0.1 crashes the apiserver
# ("fatal error: fault … mapiterinit") on the first custom resource;
# Debian's reflect2 1.0.2 does not.
rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
cp -r "$REFLECT2" "$TREE/vendor/github.com/modern-go/reflect2"

say "building ${BINS[*]} $KUBE_VERSION with $(go version | awk '{print $3}') (about 7 minutes on 2 cores, niced)"
what=""
for b in "${BINS[@]}"; do what+="cmd/$b "; done
(
  cd "$TREE"
  export GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 \
    KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean \
    GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
  nice -n 19 make WHAT="${what% }"
) >"$WORK/build.log" 2>&1 || die "make failed; the last lines of $WORK/build.log: $(tail -n 15 "$WORK/build.log")"

OUT="$TREE/_output/local/bin/linux/amd64"
mkdir -p "$CACHE/bin.new"
for b in "${BINS[@]}"; do
  [[ -x $OUT/$b ]] || die "the build finished but left no $OUT/$b; see $WORK/build.log"
  "$OUT/$b" --version 2>/dev/null | grep -q "$KUBE_VERSION" \
    || die "$OUT/$b --version does not say $KUBE_VERSION"
  cp "$OUT/$b" "$CACHE/bin.new/$b"
done

say "building ${NODE_BINS[*]} $KUBE_VERSION for the local cluster (a few more minutes)"
what=""
for b in "${NODE_BINS[@]}"; do what+="cmd/$b "; done
rm -f "$CACHE/node-build.failed"
if (
  cd "$TREE"
  export GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 \
    KUBE_GIT_VERSION=$KUBE_VERSION KUBE_GIT_TREE_STATE=clean \
    GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
  nice -n 19 make WHAT="${what% }"
) >"$WORK/build-node.log" 2>&1; then
  for b in "${NODE_BINS[@]}"; do
    if [[ -x $OUT/$b ]]; then
      cp "$OUT/$b" "$CACHE/bin.new/$b"
    else
      echo "the build left no $b" >>"$CACHE/node-build.failed"
    fi
  done
else
  { echo "make WHAT=\"${what% }\" failed; the last lines of its log:"; tail -n 25 "$WORK/build-node.log"; } >"$CACHE/node-build.failed"
  say "warning: the node binaries did not build (see $CACHE/node-build.failed); the control plane is fine"
fi
rm -rf "$CACHE/bin"
mv "$CACHE/bin.new" "$CACHE/bin"
rm -rf "$WORK"
link_checkout
say "built ${BINS[*]} ${NODE_BINS[*]} $KUBE_VERSION into $CACHE/bin in $((SECONDS - t0)) s"
