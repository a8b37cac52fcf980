#!/usr/bin/env bash
# Install GhubAi roles as systemd services on this machine, or take them away again.
#
#   sudo scripts/install-systemd.sh ROLE...              install, enable and start (registry hub worker proxy)
#   sudo scripts/install-systemd.sh --uninstall ROLE...  stop, disable, remove the units (configs stay)
#   sudo scripts/install-systemd.sh --purge ROLE...      the same, and remove /etc/ghubai when no role is left
#
# Installing creates the system user `ghubai`, a virtual environment in /opt/ghubai with GhubAi from this
# checkout (or from GHUBAI_PACKAGE, e.g. "ghubai==0.1.0"), /etc/ghubai/ROLE.toml from `ghubai init` (an
# existing file is never overwritten), and /etc/systemd/system/ghubai-ROLE.service.
# Removing the last role also removes /opt/ghubai and the user.
#
# GHUBAI_ROOT stages everything under another directory (a package build, or the tests); with it the
# script changes no user and runs no systemctl unless SYSTEMCTL is set.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
root="${GHUBAI_ROOT:-}"
prefix="$root/opt/ghubai"
etc="$root/etc/ghubai"
units="$root/etc/systemd/system"
systemctl="${SYSTEMCTL:-$([ -z "$root" ] && echo systemctl || echo true)}"
python="${PYTHON:-python3}"
roles_known=" registry hub worker proxy "

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

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
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "run as root (it creates a user, /opt/ghubai, /etc/ghubai and systemd units)" >&2
    exit 1
fi

as_root_only() { [ -z "$root" ] && "$@" || true; }

install_roles() {
    if [ -z "$root" ] && ! getent passwd ghubai >/dev/null; then
        useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin ghubai
        echo "created system user ghubai"
    fi
    [ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix"
    "$prefix/bin/pip" install --quiet --upgrade "${GHUBAI_PACKAGE:-$here}"
    install -m 0644 "$here/README.md" "$prefix/README.md"
    echo "GhubAi $("$prefix/bin/ghubai" --version | cut -d' ' -f2) in $prefix"

    mkdir -p "$etc" "$units"
    defaults="$(mktemp -d)"
    trap 'rm -rf "$defaults"' EXIT
    "$prefix/bin/ghubai" init --dir "$defaults" >/dev/null
    for role in "$@"; do
        if [ -e "$etc/$role.toml" ]; then
            echo "kept $etc/$role.toml"
        else
            # Configs hold secrets (tokens, API keys): readable by root and the service only.
            install -m 0640 "$defaults/$role.toml" "$etc/$role.toml"
            as_root_only chgrp ghubai "$etc/$role.toml"
            echo "wrote $etc/$role.toml"
        fi
        install -m 0644 "$here/systemd/ghubai-$role.service" "$units/ghubai-$role.service"
    done
    "$systemctl" daemon-reload
    for role in "$@"; do
        "$systemctl" enable --now --no-block "ghubai-$role.service"
        echo "enabled ghubai-$role.service: edit $etc/$role.toml, then 'systemctl restart ghubai-$role'"
    done
}

uninstall_roles() {
    for role in "$@"; do
        if [ -e "$units/ghubai-$role.service" ]; then
            "$systemctl" disable --now "ghubai-$role.service" || true
            rm -f "$units/ghubai-$role.service"
            echo "removed ghubai-$role.service"
        fi
    done
    "$systemctl" daemon-reload
    if compgen -G "$units/ghubai-*.service" >/dev/null; then
        echo "other GhubAi units remain: kept $prefix and the user ghubai"
        return
    fi
    rm -rf "$prefix"
    echo "removed $prefix"
    if [ -z "$root" ] && getent passwd ghubai >/dev/null; then
        userdel ghubai
        echo "removed system user ghubai"
    fi
    if [ "$action" = purge ]; then
        rm -rf "$etc"
        echo "removed $etc"
    else
        echo "kept $etc (use --purge to remove it)"
    fi
}

if [ "$action" = install ]; then install_roles "$@"; else uninstall_roles "$@"; fi
