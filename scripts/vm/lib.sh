# shellcheck shell=bash
# Shared helpers for scripts/vm/*.sh. Source it; do not run it.

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$VM_DIR/../.." && pwd)
# Downloaded kernels, private apt state and built images live here (target/ is git-ignored).
# shellcheck disable=SC2034  # used by the scripts that source this file
VM_CACHE=${PRECOPY_VM_CACHE:-$REPO_ROOT/target/vm-cache}

log() { printf '[vm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[vm] ERROR: %s\n' "$*" >&2; exit 1; }

# Install the Debian packages named on the command line if a command they provide is missing.
# Usage: need_pkgs cmd:package [cmd:package ...]
need_pkgs() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*} pkg=${pair#*:}
        if [[ $cmd == /* ]]; then [[ -e $cmd ]] && continue
        else command -v "$cmd" >/dev/null 2>&1 && continue; fi
        missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]} and not root: install them first"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        apt-get update >&2 || die "apt-get update failed"
        apt-get install -y --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
}

# With `set -e`, say where an unexpected failure happened instead of exiting silently.
# shellcheck disable=SC2154  # assigned inside the trap string
trap '__vm_rc=$?; printf "[vm] ERROR: %s: line %s: command exited %s\n" "$(basename "${BASH_SOURCE[0]:-$0}")" "$LINENO" "$__vm_rc" >&2' ERR
