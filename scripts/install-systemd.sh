#!/usr/bin/env bash
# Install GhubAi roles as systemd services on this machine, or take them away again.
#
#   sudo scripts/install-systemd.sh ROLE...              install or upgrade, enable, start (registry hub worker proxy)
#   sudo scripts/install-systemd.sh --uninstall ROLE...  stop, disable, remove the units (configs and user stay)
#   sudo scripts/install-systemd.sh --purge ROLE...      the same, and once no role is left /etc/ghubai and the user
#
# Installing creates the system user and group `ghubai`, a virtual environment in /opt/ghubai with GhubAi from
# this checkout (or from GHUBAI_PACKAGE, e.g. "ghubai==0.1.0"), /etc/ghubai/ROLE.toml from `ghubai init` (an
# existing file is never overwritten; every config is made readable by the service and nobody else), and
# /etc/systemd/system/ghubai-ROLE.service, and links /usr/local/bin/ghubai to the venv's. Running it again upgrades the code and restarts the running
# roles. Removing the last role also removes /opt/ghubai. Needs python3 >= 3.11 with venv (Debian:
# python3-venv); PYTHON names another interpreter, which the ghubai user must be able to run.
#
# GHUBAI_ROOT stages everything under another directory, for the tests (the venv's scripts then point
# into it); it changes no user or group and runs no systemctl unless SYSTEMCTL is set.
set -euo pipefail
umask 022

here="$(cd "$(dirname "$0")/.." && pwd)"
root="${GHUBAI_ROOT:-}"
prefix="$root/opt/ghubai"
etc="$root/etc/ghubai"
units="$root/etc/systemd/system"
bindir="$root/usr/local/bin"  # `ghubai` on the PATH, for the README's commands (check, registry add-hub, status)
systemctl="${SYSTEMCTL:-$([ -z "$root" ] && echo systemctl || echo true)}"
python="${PYTHON:-$([ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)}"
roles_known=" registry hub worker proxy "

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
fail() { echo "install-systemd.sh: $*" >&2; exit 1; }
real() { [ -z "$root" ]; }  # acting on this machine, not staging

action=install
case "${1:-}" in
    --uninstall) action=uninstall; shift ;;
    --purge) action=purge; shift ;;
    -h|--help|"") usage ;;
esac
[ $# -gt 0 ] || usage
for role in "$@"; do
    [[ "$roles_known" == *" $role "* ]] || { echo "unknown role: $role (registry, hub, worker, proxy)" >&2; exit 2; }
done
if real && [ "$(id -u)" -ne 0 ]; then
    fail "run as root (it creates a user, /opt/ghubai, /etc/ghubai and systemd units)"
fi

create_user() {
    getent group ghubai >/dev/null || groupadd --system ghubai
    if ! getent passwd ghubai >/dev/null; then
        useradd --system --gid ghubai --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin ghubai
        echo "created system user ghubai"
    fi
}

build="" defaults=""
trap 'rm -rf ${build:+"$build"} ${defaults:+"$defaults"}' EXIT

install_code() {
    # pip builds in a copy: nothing root-owned is left in the checkout, nothing stale from an old build ships
    local source="${GHUBAI_PACKAGE:-}" have wanted
    if [ -z "$source" ]; then
        build="$(mktemp -d)"
        cp -r "$here/pyproject.toml" "$here/README.md" "$here/LICENSE" "$here/ghubai" "$build/"
        source="$build"
    fi
    # a venv made from another Python (or a half-made one) is made again from this one: by its
    # interpreter and version, not its folder (Debian's python3.10 and python3.11 are both in /usr/bin)
    local which='import os, sys; print(os.path.realpath(sys._base_executable), sys.version_info[:2])'
    wanted="$("$python" -c "$which")" || fail "cannot run $python"
    have="$("$prefix/bin/python" -c "$which" 2>/dev/null || true)"
    if [ "$have" != "$wanted" ] || ! "$prefix/bin/python" -m pip --version >/dev/null 2>&1; then
        "$python" -m venv --clear "$prefix" || fail "cannot make a venv with $python (Debian: apt install python3-venv)"
    fi
    "$prefix/bin/pip" install --quiet --upgrade "$source"
    install -m 0644 "$here/README.md" "$prefix/README.md"
    if real && ! runuser -u ghubai -- "$prefix/bin/ghubai" --version >/dev/null 2>&1; then
        fail "user ghubai cannot run $prefix/bin/ghubai (its Python is $(readlink -f "$prefix/bin/python3")); use PYTHON=/usr/bin/python3"
    fi
    echo "GhubAi $("$prefix/bin/ghubai" --version | cut -d' ' -f2) in $prefix"
    mkdir -p "$bindir"
    if [ ! -e "$bindir/ghubai" ] || [ -L "$bindir/ghubai" ]; then
        ln -sfn "$prefix/bin/ghubai" "$bindir/ghubai"
    else
        echo "kept $bindir/ghubai (not a link of ours): run $prefix/bin/ghubai"
    fi
}

# /etc/ghubai: setgid group ghubai, so a file an editor or `ghubai registry add-hub` writes anew stays readable
# by the service; configs hold tokens and keys: 0640, nobody else reads them.
own_config() {
    chmod 0640 "$1"
    if real; then chgrp ghubai "$1"; fi
}

install_roles() {
    if real; then create_user; fi
    install_code
    mkdir -p "$units"
    install -d -m 2750 "$etc"
    if real; then chgrp ghubai "$etc"; fi
    defaults="$(mktemp -d)"
    "$prefix/bin/ghubai" init --dir "$defaults" >/dev/null
    for role in "$@"; do
        if [ -e "$etc/$role.toml" ]; then
            echo "kept $etc/$role.toml"
        else
            install -m 0640 "$defaults/$role.toml" "$etc/$role.toml"
            echo "wrote $etc/$role.toml"
        fi
        own_config "$etc/$role.toml"
        install -m 0644 "$here/systemd/ghubai-$role.service" "$units/ghubai-$role.service"
    done
    "$systemctl" daemon-reload
    "$systemctl" try-restart --no-block 'ghubai-*.service'  # those already running take the new code and units
    for role in "$@"; do
        "$systemctl" enable --now --no-block "ghubai-$role.service"
        echo "enabled ghubai-$role.service: edit $etc/$role.toml, then 'systemctl restart ghubai-$role'"
    done
}

uninstall_roles() {
    for role in "$@"; do
        if [ -e "$units/ghubai-$role.service" ]; then
            "$systemctl" disable --now "ghubai-$role.service" || true
            rm -rf "$units/ghubai-$role.service" "$units/ghubai-$role.service.d"
            echo "removed ghubai-$role.service"
        fi
    done
    "$systemctl" daemon-reload
    if compgen -G "$units/ghubai-*.service" >/dev/null; then
        echo "other GhubAi units remain: kept $prefix"
        return
    fi
    rm -rf "$prefix"
    echo "removed $prefix"
    if [ "$(readlink "$bindir/ghubai" 2>/dev/null)" = "$prefix/bin/ghubai" ]; then rm -f "$bindir/ghubai"; fi
    if [ "$action" != purge ]; then
        echo "kept $etc and the user ghubai, whose group reads it (use --purge to remove both)"
        return
    fi
    rm -rf "$etc"
    echo "removed $etc"
    if real && getent passwd ghubai >/dev/null; then
        userdel ghubai
        getent group ghubai >/dev/null && groupdel ghubai 2>/dev/null || true
        echo "removed system user ghubai"
    fi
}

if [ "$action" = install ]; then install_roles "$@"; else uninstall_roles "$@"; fi
