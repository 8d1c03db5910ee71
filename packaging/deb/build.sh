#!/usr/bin/env bash
# Builds sluice_<version>-1_{amd64,arm64,armhf}.deb into target/debian/: the
# binaries (the agent, sluice, and its load benchmark, sluice-bench) with
# cargo-zigbuild against glibc $SLUICE_GLIBC (default 2.28, so that Debian
# 10/11 and Raspberry Pi OS buster/bullseye can install them), the package
# with cargo-deb (metadata in agent/Cargo.toml); then sets Depends to what
# the packaged binaries really need: libc6 at least the newest GLIBC_ symbol
# version they link against (for cross builds, dpkg-shlibdeps would claim
# the build host's libc6 instead), libgcc-s1 likewise, and procps (the
# unit's ExecReload runs /bin/kill).
#
#   packaging/deb/build.sh [TARGET ...]   (default: all three)
#
# Needs cargo-deb, cargo-zigbuild and zig, at the versions in
# packaging/cross/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
fi

glibc_floor="${SLUICE_GLIBC:-2.28}"
# The time every file in the package carries (reproducible builds).
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
for tool in cargo-deb cargo-zigbuild; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found: cargo install --locked $tool" >&2; exit 1; }
done

for target in "${targets[@]}"; do
    cargo zigbuild -p sluice --bin sluice --profile dist --target "$target.$glibc_floor"
    # sluice-bench, the load benchmark shipped beside the agent, in a build
    # of its own: built together, the two would share (unify) their
    # dependencies' features, and the agent would carry the benchmark's.
    cargo zigbuild -p sluice-benches --bin sluice-bench --profile dist --target "$target.$glibc_floor"
    deb=$(cargo deb -p sluice --profile dist --target "$target" --no-build | tail -n 1)
    work=$(mktemp -d)
    # mktemp -d makes the directory 0700; it becomes the package's ./
    chmod 0755 "$work"
    dpkg-deb -R "$deb" "$work"
    # The newest GLIBC_ and GCC_ symbol versions either binary needs.
    glibc="" gcc=""
    for bin in "$work/usr/bin/sluice" "$work/usr/bin/sluice-bench"; do
        for lib in $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
            case "$lib" in
                libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*)
                    glibc=$( (echo "$glibc"; readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//') | sort -uV | tail -n 1)
                    ;;
                libgcc_s.so.1)
                    gcc=$( (echo "${gcc:-3.0}"; readelf -V --wide "$bin" | grep -o 'GCC_[0-9][0-9.]*' | sed 's/GCC_//') | sort -uV | tail -n 1)
                    ;;
                *)
                    echo "error: $target: $bin needs an unexpected shared library $lib; add its package to build.sh" >&2
                    exit 1
                    ;;
            esac
        done
    done
    depends=()
    [ -n "$glibc" ] && depends+=("libc6 (>= $glibc)")
    [ -n "$gcc" ] && depends+=("libgcc-s1 (>= $gcc)")
    # The unit's ExecReload runs /bin/kill.
    depends+=("procps")
    line=$(printf '%s\n' "${depends[@]}" | sort -u | paste -sd, - | sed 's/,/, /g')
    sed -i -E "s/^Depends:.*/Depends: $line/" "$work/DEBIAN/control"
    # The package's checksums (dpkg --verify, debsums; cargo-deb writes
    # none), conffiles left out as dh_md5sums does: dpkg tracks those itself.
    (cd "$work" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort \
        | grep -v -x -F -f <(sed 's|^/||' DEBIAN/conffiles 2>/dev/null || true) \
        | tr '\n' '\0' | xargs -0 md5sum) > "$work/DEBIAN/md5sums"
    chmod 0644 "$work/DEBIAN/md5sums"
    # Every file and directory gets the commit's time, as cargo-deb set
    # them, so that the same commit builds the same package.
    find "$work" -exec touch -h -d "@$epoch" {} +
    SOURCE_DATE_EPOCH="$epoch" dpkg-deb --root-owner-group -Zxz -b "$work" "$deb" > /dev/null
    rm -rf "$work"
    echo "$deb: Depends: $line; $(dpkg-deb --fsys-tarfile "$deb" | tar -tvf - ./usr/bin/sluice ./usr/bin/sluice-bench | awk '{printf "%s %s bytes; ", $6, $3}')"
done
