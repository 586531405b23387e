#!/usr/bin/env bash
# Installs Consul 1.8.7 (Debian bullseye's package; bookworm has none) as /usr/local/bin/consul.
# Uses a private apt configuration so the system's sources are never touched, verifies the
# package's sha256, and falls back to ../shared/vendor/ only if the archive cannot be reached.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="1.8.7"
deb_name="consul_1.8.7+dfsg1-2+b3_amd64.deb"
sha256="e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"
dest="/usr/local/bin/consul"
say() { printf 'deps: consul: %s\n' "$*"; }

if [ -x "$dest" ] && "$dest" version 2>/dev/null | head -1 | grep -q "v$version"; then
    say "$dest is already Consul v$version"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The mirror the machine itself uses (deb822 or one-line format), so we hit what is reachable.
mirror="$( { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
             grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
               | grep -oE 'https?://[^ ]+'; } | grep -v security | head -1 || true)"
mirror="${mirror%/}"

deb=""
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" >"$work/etc/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root
)
if [ -z "$mirror" ]; then
    # No guessing of a host: the machine's own sources say which archive is reachable.
    say "the machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/) name no Debian mirror; trying the vendored copy"
    echo "no mirror" >"$work/apt.log"
else
    say "fetching $deb_name from $mirror (bullseye)"
    if apt-get "${apt_opts[@]}" update -qq >"$work/apt.log" 2>&1 \
       && (cd "$work" && apt-get "${apt_opts[@]}" download "consul=1.8.7+dfsg1-2+b3" >>"$work/apt.log" 2>&1); then
        deb="$(ls "$work"/consul_*.deb 2>/dev/null | head -1)"
    fi
fi
if [ -z "$deb" ]; then
    say "the bullseye archive could not be used ($(tail -1 "$work/apt.log" 2>/dev/null)); using the vendored copy"
    for d in "$here/../shared/vendor" "$here/vendor"; do
        [ -f "$d/$deb_name" ] && { deb="$d/$deb_name"; break; }
    done
    [ -n "$deb" ] || {
        echo "deps: consul: cannot install Consul $version: no Debian mirror reachable through the machine's apt sources and no $deb_name in ../shared/vendor/ or vendor/; add a Debian mirror to the apt sources or put that .deb (sha256 $sha256) in vendor/" >&2
        exit 1
    }
fi
got="$(sha256sum "$deb" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
    echo "deps: consul: sha256 of $deb is $got, expected $sha256; refusing to install it" >&2
    exit 1
fi
say "sha256 verified ($sha256)"
dpkg-deb -x "$deb" "$work/x"
install -m 0755 "$work/x/usr/bin/consul" "$dest"
say "installed $dest: $("$dest" version | head -1)"
