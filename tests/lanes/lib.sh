# Shared helpers for the lane-K scripts (sourced, not executed).
# Everything is cached under tests/lanes/cache (git-ignored); cache entries carry
# package versions / content hashes in their names so a new Debian kernel, busybox
# or a changed init script rebuilds exactly what depends on it.

set -eu

LANES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LANES_DIR/../.." && pwd)
CACHE=${LANEK_CACHE:-$LANES_DIR/cache}
OUT=${LANEK_OUT:-$LANES_DIR/out}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Seconds since the epoch with millisecond resolution (for timing reports).
now() { date +%s.%3N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (apt-get and cpio ownership need it)"; }

# apt-get update at most once per script run, and only when the lists are older
# than an hour (LANEK_APT_UPDATE=1 forces, =0 never).
_apt_updated=0
apt_update() {
    [ "$_apt_updated" = 1 ] && return 0
    _apt_updated=1
    case "${LANEK_APT_UPDATE:-auto}" in
        0) return 0 ;;
        1) ;;
        *) if [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | head -1)" ]; then
               return 0
           fi ;;
    esac
    log "apt-get update"
    apt-get update -qq >&2
}

# ensure_cmd CMD PACKAGE: install PACKAGE when CMD is missing.
ensure_cmd() {
    command -v "$1" >/dev/null 2>&1 && return 0
    need_root
    apt_update
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

# ensure_file PATH PACKAGE
ensure_file() {
    [ -e "$1" ] && return 0
    need_root
    apt_update
    log "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

# Resolve, with one apt-cache call per script tree (exported to child scripts), the
# kernel package linux-image-amd64 points to and the candidate versions we use.
apt_resolve() {
    [ -n "${LANEK_KPKG:-}" ] && return 0
    apt_update
    local info
    info=$(apt-cache show --no-all-versions linux-image-amd64 busybox-static 2>/dev/null)
    LANEK_KPKG=$(echo "$info" | awk '/^Depends: linux-image-[0-9]/ { print $2; exit }')
    LANEK_KPKG_VER=$(echo "$info" | sed -n 's/^Depends: linux-image-[0-9][^ ]* (= \([^)]*\)).*/\1/p' | head -1)
    LANEK_BB_VER=$(echo "$info" | awk '/^Package: busybox-static/ { f = 1 } f && /^Version:/ { print $2; exit }')
    [ -n "$LANEK_KPKG" ] && [ -n "$LANEK_KPKG_VER" ] && [ -n "$LANEK_BB_VER" ] ||
        die "cannot resolve linux-image-amd64 / busybox-static (apt lists missing?)"
    export LANEK_KPKG LANEK_KPKG_VER LANEK_BB_VER
}
kernel_pkg() { apt_resolve; echo "$LANEK_KPKG"; }
pkg_version() {
    apt_resolve
    case "$1" in
        "$LANEK_KPKG") echo "$LANEK_KPKG_VER" ;;
        busybox-static) echo "$LANEK_BB_VER" ;;
        *) apt-cache show --no-all-versions "$1" | awk '/^Version:/ { print $2; exit }' ;;
    esac
}

# fetch_deb PACKAGE -> prints the path of the cached .deb (downloaded once per version).
# Only the .deb is kept (the extracted kernel is ~400 MB); extract_deb unpacks on demand.
fetch_deb() {
    local pkg=$1 ver dir deb
    ver=$(pkg_version "$pkg")
    [ -n "$ver" ] || die "no version for $pkg"
    dir=$CACHE/debs
    mkdir -p "$dir"
    deb=$(ls "$dir/${pkg}_${ver##*:}_"*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
        local t0 tmp; t0=$(now)
        tmp=$(mktemp -d "$dir/dl.XXXXXX")
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2)
        deb=$(ls "$tmp"/*.deb)
        mv "$deb" "$dir/${pkg}_${ver##*:}_amd64.deb"
        rm -rf "$tmp"
        deb=$dir/${pkg}_${ver##*:}_amd64.deb
        log "fetched $pkg $ver in $(elapsed "$t0") s"
    fi
    echo "$deb"
}

# extract_deb DEB DIR: unpack a .deb's files into DIR.
extract_deb() { mkdir -p "$2" && dpkg-deb -x "$1" "$2"; }

# Module handling without kmod: read `depends=` / `softdep=` from each module's
# .modinfo strings. resolve_modules MODDIR NAME... prints module files (relative
# to MODDIR) in load order, dependencies first. Names missing from MODDIR are
# assumed built in (e.g. xen-platform-pci is bool in Debian's config) and are
# reported on stderr.
_modinfo_field() { # FILE FIELD
    local f=$1
    case "$f" in
        *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *.gz) gzip -dc "$f" ;; *) cat "$f" ;;
    esac | tr '\0' '\n' | grep -a "^$2=" | head -1 | cut -d= -f2-
}
resolve_modules() {
    local moddir=$1; shift
    local index; index=$(mktemp)
    (cd "$moddir" && find kernel -name '*.ko*') |
        awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko.*/, "", n); gsub(/-/, "_", n); print n, $0 }' > "$index"
    local -A seen=()
    local order=()
    _visit() {
        local name=${1//-/_} file deps soft d
        [ -n "${seen[$name]:-}" ] && return 0
        seen[$name]=1
        file=$(awk -v n="$name" '$1 == n { print $2; exit }' "$index")
        if [ -z "$file" ]; then
            log "module $name: not a module in this kernel (built in?)"
            return 0
        fi
        deps=$(_modinfo_field "$moddir/$file" depends)
        # softdep=pre: a b post: c  -> load the pre ones first
        soft=$(_modinfo_field "$moddir/$file" softdep | sed -n 's/.*pre:\([^:]*\)\( post:.*\)\{0,1\}$/\1/p')
        for d in ${deps//,/ } $soft; do _visit "$d"; done
        order+=("$file")
    }
    local m
    for m in "$@"; do _visit "$m"; done
    rm -f "$index"
    printf '%s\n' "${order[@]}"
}

# copy_modules MODDIR DEST NAME...: decompressed copies under DEST/lib/modules/KVER/,
# plus DEST/etc/modules.load listing them in load order (busybox insmod reads .ko only).
copy_modules() {
    local moddir=$1 dest=$2; shift 2
    local kver; kver=$(basename "$moddir")
    local f out
    mkdir -p "$dest/lib/modules/$kver" "$dest/etc"
    : > "$dest/etc/modules.load"
    while read -r f; do
        [ -n "$f" ] || continue
        out=${f%.xz}; out=${out%.zst}; out=${out%.gz}
        mkdir -p "$dest/lib/modules/$kver/$(dirname "$out")"
        case "$f" in
            *.xz) xz -dc "$moddir/$f" ;; *.zst) zstd -qdc "$moddir/$f" ;; *.gz) gzip -dc "$moddir/$f" ;; *) cat "$moddir/$f" ;;
        esac > "$dest/lib/modules/$kver/$out"
        echo "/lib/modules/$kver/$out" >> "$dest/etc/modules.load"
    done < <(resolve_modules "$moddir" "$@")
}

# install_busybox BUSYBOX DEST: static busybox + applet symlinks.
install_busybox() {
    local bb=$1 dest=$2 a
    mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
    cp "$bb" "$dest/bin/busybox"
    for a in $("$bb" --list-full); do
        [ -e "$dest/$a" ] || ln -s /bin/busybox "$dest/$a"
    done
}

# copy_with_libs BINARY DEST: the binary at the same path plus what ldd lists.
copy_with_libs() {
    local bin=$1 dest=$2 lib
    mkdir -p "$dest/$(dirname "$bin")"
    cp -L "$bin" "$dest/$bin"
    for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
        [ -e "$dest/$lib" ] && continue
        mkdir -p "$dest/$(dirname "$lib")"
        cp -L "$lib" "$dest/$lib"
    done
}

# mkcpio DIR OUT: newc archive, root-owned, stable order.
mkcpio() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$2"
}

# A short content hash of files (for cache keys).
hash_files() { cat "$@" | sha256sum | cut -c1-12; }

# select_scenarios DIR [NAME|FILE...]: sets the array `files` to the scenario files named (a path,
# or NAME for DIR/NAME.sh), or with no names to every DIR/*.sh whose SCENARIO_DEFAULT is not 0.
select_scenarios() {
    local dir=$1 f d a
    shift
    files=()
    if [ $# -eq 0 ]; then
        for f in "$dir"/*.sh; do
            d=$(. "$f"; echo "${SCENARIO_DEFAULT:-1}")
            [ "$d" = 0 ] || files+=("$f")
        done
    else
        for a in "$@"; do
            if [ -f "$a" ]; then files+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")")
            elif [ -f "$dir/$a.sh" ]; then files+=("$dir/$a.sh")
            else die "no scenario $a"; fi
        done
    fi
}
