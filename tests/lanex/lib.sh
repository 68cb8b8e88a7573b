# Shared helpers for the lane-X scripts (sourced, not executed).
# Reuses lane K's helpers (tests/lanes/lib.sh: apt_resolve, fetch_deb, mkcpio, log, ...)
# without changing them. Lane K's package cache (tests/lanes/cache/debs) is shared for the
# kernel .deb; lane X's own packages and builds live under tests/lanex/cache (git-ignored),
# because lane K's kit build prunes every other .deb from its own cache directory.

LANEX_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lanes/lib.sh
source "$LANEX_DIR/../lanes/lib.sh"
XCACHE=${LANEX_CACHE:-$LANEX_DIR/cache}
XOUT=${LANEX_OUT:-$LANEX_DIR/out}

# The Xen release lane X runs (Debian bookworm ships 4.17).
XEN_SERIES=4.17

# fetch_xdeb PACKAGE VERSION -> path of the cached .deb (that exact version) under lane X's own
# cache.
fetch_xdeb() {
    local pkg=$1 ver=$2 dir=$XCACHE/debs deb tmp t0
    mkdir -p "$dir"
    deb=$dir/${pkg}_${ver##*:}_amd64.deb
    if [ ! -f "$deb" ]; then
        t0=$(now)
        tmp=$(mktemp -d "$dir/dl.XXXXXX")
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2)
        mv "$tmp"/*.deb "$deb"
        rm -rf "$tmp"
        log "fetched $pkg $ver in $(elapsed "$t0") s"
    fi
    echo "$deb"
}

# debian_mirror: the first URIs: line of apt's own Debian source (read at run time so no
# registry host name is ever written into the project).
debian_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources m
    if [ -f "$f" ]; then
        m=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' "$f")
    fi
    if [ -z "${m:-}" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1 == "deb" && $3 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [ -n "${m:-}" ] || die "cannot find the Debian mirror in apt's sources"
    echo "$m"
}
