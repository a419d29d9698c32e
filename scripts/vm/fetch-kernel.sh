#!/usr/bin/env bash
# Fetch a Debian kernel image for a release through apt and extract its vmlinuz.
#
#   scripts/vm/fetch-kernel.sh SUITE [--refresh]     SUITE: trixie | bookworm | any Debian codename
#
# Prints the directory that holds `vmlinuz`, `config` and `kernel.env` (SUITE, PACKAGE, VERSION,
# RELEASE) on stdout. Everything is cached under $PRECOPY_VM_CACHE (default target/vm-cache).
#
# The mirror is never hard-coded: it is read from the machine's own apt sources
# (/etc/apt/sources.list, /etc/apt/sources.list.d/*.list and deb822 *.sources). If SUITE is already
# one of the machine's configured suites, the machine's apt is used as it is. Otherwise a private apt
# configuration (own sources list, lists and cache directories) reuses the machine's Debian mirror
# URI with SUITE's name, so the machine's apt state is left untouched.
set -euo pipefail
# shellcheck source=scripts/vm/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

suite=${1:?usage: fetch-kernel.sh SUITE [--refresh]}
refresh=0
[[ ${2:-} == --refresh ]] && refresh=1
[[ $suite =~ ^[a-z]+$ ]] || die "suite must be a Debian codename, got '$suite'"

kdir=$VM_CACHE/kernel-$suite

# Under TCG, decompressing the bzImage costs seconds (xz: ~9 s for bookworm's). Debian builds in PVH
# (CONFIG_PVH), so qemu can boot the uncompressed ELF vmlinux directly: unpack it once here, the way
# the kernel's scripts/extract-vmlinux does, and keep it only if it is an ELF with the PVH entry note
# (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY). boot.sh falls back to vmlinuz otherwise.
make_vmlinux() {
    local k=$1/vmlinuz tmp=$1/vmlinux.tmp magic tool off
    rm -f "$1/vmlinux"
    for pair in '\x28\xb5\x2f\xfd:zstd -dcq' '\xfd7zXZ\x00:xz -dcq' '\x1f\x8b\x08:gzip -dcq' \
                '\x02\x21\x4c\x18:lz4 -dcq' '\x5d\x00\x00\x00:xz -dcq --format=lzma'; do
        magic=${pair%%:*} tool=${pair#*:}
        command -v "${tool%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$k" | cut -d: -f1 | head -5); do
            tail -c +$((off + 1)) "$k" | $tool >"$tmp" 2>/dev/null || true
            if readelf -h "$tmp" >/dev/null 2>&1; then
                if readelf -n "$tmp" 2>/dev/null | grep -q 'Xen.*(0x00000012)'; then
                    mv "$tmp" "$1/vmlinux"; echo yes; return
                fi
                break 2
            fi
        done
    done
    rm -f "$tmp"; echo no
}

if ((!refresh)) && [[ -s $kdir/vmlinuz && -s $kdir/kernel.env ]]; then
    if ! grep -q '^PVH=' "$kdir/kernel.env"; then echo "PVH=$(make_vmlinux "$kdir")" >>"$kdir/kernel.env"; fi
    # shellcheck disable=SC1091
    log "$suite: using cached $(. "$kdir/kernel.env"; echo "$PACKAGE $VERSION")"
    echo "$kdir"; exit 0
fi

need_pkgs apt-get:apt dpkg-deb:dpkg readelf:binutils xz:xz-utils zstd:zstd

# ---- read the machine's apt sources: one "type<TAB>uri<TAB>suite<TAB>components<TAB>signed-by" a line
list_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk '
            { sub(/#.*/, "") }
            $1 != "deb" { next }
            {
                line = $0; sub(/^[ \t]*deb[ \t]+/, "", line); opts = ""
                if (line ~ /^\[/) { opts = line; sub(/\].*/, "", opts); sub(/^[^\]]*\][ \t]*/, "", line) }
                n = split(line, w, /[ \t]+/); if (n < 2) next
                sb = ""; if (match(opts, /signed-by=[^ \t\]]+/)) sb = substr(opts, RSTART + 10, RLENGTH - 10)
                comps = ""; for (i = 3; i <= n; i++) comps = comps (i > 3 ? " " : "") w[i]
                print "deb\t" w[1] "\t" w[2] "\t" comps "\t" sb
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk '
            function flush(   nt, nu, ns, a, b, c, i, j, k) {
                if (enabled != "no" && types != "" && uris != "" && suites != "") {
                    nt = split(types, a, /[ \t]+/); nu = split(uris, b, /[ \t]+/); ns = split(suites, c, /[ \t]+/)
                    for (i = 1; i <= nt; i++) for (j = 1; j <= nu; j++) for (k = 1; k <= ns; k++)
                        if (a[i] != "" && b[j] != "" && c[k] != "") print a[i] "\t" b[j] "\t" c[k] "\t" comps "\t" sb
                }
                types = uris = suites = comps = sb = ""; enabled = ""; key = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { next }                       # continuation line (e.g. an inline key): ignored
            {
                key = tolower($0); sub(/:.*/, "", key); val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
                if (key == "types") types = val; else if (key == "uris") uris = val
                else if (key == "suites") suites = val; else if (key == "components") comps = val
                else if (key == "enabled") enabled = tolower(val)
                else if (key == "signed-by" && val ~ /^\//) sb = val
            }
            END { flush() }' "$f"
    done
}

sources=$(list_sources | awk -F'\t' '$1 == "deb"')
[[ -n $sources ]] || die "no 'deb' entries found in the machine's apt sources"
release_re='^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldoldstable|oldstable|stable|testing|unstable)$'
security_re='^(buster|bullseye|bookworm|trixie|forky|duke|oldoldstable|oldstable|stable|testing)(-security|/updates)$'
archive_line=$(awk -F'\t' -v re="$release_re" '$3 ~ re { print; exit }' <<<"$sources")
security_line=$(awk -F'\t' -v re="$security_re" '$3 ~ re { print; exit }' <<<"$sources")
[[ -n $archive_line ]] || die "the machine's apt sources have no Debian release suite (looked for $release_re)"
IFS=$'\t' read -r _ archive_uri _ _ archive_sb <<<"$archive_line"
security_uri='' security_sb=''
[[ -n $security_line ]] && IFS=$'\t' read -r _ security_uri _ _ security_sb <<<"$security_line"

# ---- machine's apt or a private one?
apt_opts=()
if awk -F'\t' -v s="$suite" '$3 == s { f = 1 } END { exit !f }' <<<"$sources"; then
    log "$suite: configured in the machine's apt sources; using the machine's apt"
    mode=host
else
    mode=private
    A=$VM_CACHE/apt-$suite
    mkdir -p "$A/sources.list.d" "$A/lists/partial" "$A/cache/archives/partial"
    {
        echo "# generated by scripts/vm/fetch-kernel.sh from the machine's apt sources"
        echo "deb ${archive_sb:+[signed-by=$archive_sb] }$archive_uri $suite main"
        echo "deb ${archive_sb:+[signed-by=$archive_sb] }$archive_uri $suite-updates main"
        [[ -n $security_uri ]] && echo "deb ${security_sb:+[signed-by=$security_sb] }$security_uri $suite-security main"
    } >"$A/sources.list"
    apt_opts=(
        -o "Dir::Etc::sourcelist=$A/sources.list" -o "Dir::Etc::sourceparts=$A/sources.list.d"
        -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o "Dir::Cache::archives=$A/cache/archives"
        -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        -o APT::Sandbox::User=root
    )
    log "$suite: not in the machine's apt sources; private apt config $A/sources.list:"
    grep -v '^#' "$A/sources.list" | sed 's/^/    /' >&2
fi

# Highest version of package $1 published in $suite, $suite-updates or $suite-security.
best_version() {
    apt-cache "${apt_opts[@]}" madison "$1" 2>/dev/null |
        awk -F'|' -v s="$suite" '{ gsub(/ /, "", $2); split($3, a, " "); split(a[2], b, "/")
            if (b[1] == s || b[1] == s "-updates" || b[1] == s "-security") print $2 }' |
        { best=''; while read -r v; do
              if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
          done; echo "$best"; }
}

update_lists() {
    if [[ $mode == private ]]; then
        log "$suite: apt-get update (private lists)"
        apt-get "${apt_opts[@]}" -q update >&2 || die "private apt-get update for $suite failed"
    else
        log "$suite: apt-get update (machine's lists)"
        apt-get -q update >&2 || die "apt-get update failed"
    fi
}

if [[ $mode == private ]]; then
    # Refresh private lists if asked, absent or older than a day.
    if ((refresh)) || ! compgen -G "$A/lists/*_dists_${suite}_InRelease" >/dev/null ||
        [[ -n $(find "$A/lists" -maxdepth 1 -name "*_dists_${suite}_InRelease" -mmin +1440) ]]; then
        update_lists
    fi
elif ((refresh)); then
    update_lists
fi

meta_ver=$(best_version linux-image-amd64)
if [[ -z $meta_ver && $mode == host ]]; then update_lists; meta_ver=$(best_version linux-image-amd64); fi
[[ -n $meta_ver ]] || die "$suite: no linux-image-amd64 found in the apt lists"
# linux-image-amd64 is a metapackage: its Depends names the real ABI package (linux-image-6.12.*-amd64).
pkg=$(apt-cache "${apt_opts[@]}" show "linux-image-amd64=$meta_ver" |
      awk -F': ' '/^Depends:/ { n = split($2, d, /, */); for (i = 1; i <= n; i++) { split(d[i], p, " ")
            if (p[1] ~ /^linux-image-[0-9]/) { print p[1]; exit } } }')
[[ -n $pkg ]] || die "$suite: cannot find the linux-image-* dependency of linux-image-amd64=$meta_ver"
ver=$(best_version "$pkg")
[[ -n $ver ]] || die "$suite: $pkg has no version in $suite"
log "$suite: linux-image-amd64 $meta_ver -> $pkg $ver"

work=$VM_CACHE/download-$suite
rm -rf "$work"; mkdir -p "$work"
download() { (cd "$work" && apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root -q download "$pkg=$ver" >&2); }
if ! download; then
    log "$suite: download failed; refreshing the lists once"
    update_lists
    ver=$(best_version "$pkg"); [[ -n $ver ]] || die "$suite: $pkg vanished from the lists"
    download || die "$suite: apt-get download $pkg=$ver failed"
fi
deb=$(ls "$work"/*.deb)
log "$suite: extracting /boot from $(basename "$deb") ($(du -h "$deb" | cut -f1))"
mkdir -p "$work/root"
# dpkg-deb -x of the whole package would also unpack ~400 MB of modules that the guest does not need.
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/root" --wildcards './boot/*'
vmlinuz=$(ls "$work"/root/boot/vmlinuz-*)
config=$(ls "$work"/root/boot/config-*)
release=${vmlinuz##*/vmlinuz-}

# The guest uses no modules: everything it needs must be built in.
missing=()
for opt in BINFMT_ELF BINFMT_SCRIPT BLK_DEV_INITRD RD_GZIP DEVTMPFS PROC_FS SYSFS TMPFS SERIAL_8250 SERIAL_8250_CONSOLE; do
    grep -qx "CONFIG_$opt=y" "$config" || missing+=("$opt")
done
((${#missing[@]} == 0)) || die "$suite: $release does not build in ${missing[*]} (modules would be needed)"

rm -rf "$kdir"; mkdir -p "$kdir"
cp "$vmlinuz" "$kdir/vmlinuz"; cp "$config" "$kdir/config"
cat >"$kdir/kernel.env" <<ENV
SUITE=$suite
PACKAGE=$pkg
VERSION=$ver
RELEASE=$release
APT=$mode
PVH=$(make_vmlinux "$kdir")
ENV
rm -rf "$work"
log "$suite: kernel $release ready in $kdir"
echo "$kdir"
