#!/bin/bash
# Build the nephele test guest reproducibly, only from Debian packages (nothing is installed on the host):
#   vmlinuz     Debian kernel (linux-image-amd64's current dependency), extracted with dpkg -x
#   initrd.img  busybox-static + virtio/ext4 modules + ./init + CGI scripts (uncompressed newc cpio)
#   disk.raw    64 MiB raw ext4 data disk (mke2fs -d, fixed UUID, hash seed and timestamps)
#   VERSIONS    the exact package versions used
# Two builds from the same .debs give byte-identical files (SOURCE_DATE_EPOCH pins every timestamp).
# usage: build.sh OUTDIR [DEBDIR]     DEBDIR caches the downloaded .debs (default OUTDIR/.debs)
# needs: apt-get, dpkg-deb, cpio, e2fsprogs (mke2fs, debugfs), kmod (depmod, modprobe)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(readlink -f "$1")
DEBS=$(readlink -f "${2:-$OUT/.debs}")
export SOURCE_DATE_EPOCH=1700000000
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export LC_ALL=C
DISK_MB=64
mkdir -p "$OUT" "$DEBS"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. packages: the .deb of the candidate version, downloaded once into DEBS
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2}'; }
if [ -z "$(candidate linux-image-amd64)" ] || [ "$(candidate linux-image-amd64)" = "(none)" ]; then
  apt-get update -qq >/dev/null
fi
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { echo "build.sh: cannot resolve the Debian kernel package (apt lists?)" >&2; exit 1; }
KVER=${KPKG#linux-image-}
fetch() {  # fetch PKG -> prints the path of its .deb in DEBS
  local v f
  v=$(candidate "$1"); f="$DEBS/$1_$(printf %s "$v" | sed 's/:/%3a/')_amd64.deb"
  if [ ! -s "$f" ]; then
    (cd "$WORK" && apt-get download "$1=$v" >/dev/null 2>&1) || { echo "build.sh: apt-get download $1=$v failed" >&2; exit 1; }
    mv "$WORK"/"$1"_*.deb "$f.tmp" && mv "$f.tmp" "$f"
  fi
  echo "$f"
}
KDEB=$(fetch "$KPKG"); BDEB=$(fetch busybox-static)
{ dpkg-deb -f "$KDEB" Package Version; dpkg-deb -f "$BDEB" Package Version; } > "$WORK/VERSIONS"
dpkg -x "$KDEB" "$WORK/k"; dpkg -x "$BDEB" "$WORK/bb"
depmod -b "$WORK/k" "$KVER"

# 2. initramfs
R=$WORK/root; mkdir -p "$R"/{bin,sbin,proc,sys,dev,data,t,mod,www/cgi-bin,etc,tmp,root}
cp "$WORK/bb/bin/busybox" "$R/bin/busybox"
MODS=$(for m in virtio_pci virtio_blk virtio_net ext4 virtio_rng; do
         modprobe -d "$WORK/k" -S "$KVER" --show-depends $m; done | awk '/^insmod/{print $2}' | awk '!s[$0]++')
: > "$R/mod/order"
for p in $MODS; do cp "$p" "$R/mod/"; basename "$p" >> "$R/mod/order"; done
install -m 755 "$HERE/init" "$R/init"
install -m 755 "$HERE/cgi-state" "$R/www/cgi-bin/state"
install -m 755 "$HERE/cgi-md5" "$R/www/cgi-bin/md5"
echo '<html><body>nephele test guest</body></html>' > "$R/www/index.html"
echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
chmod -R u+w,go-w "$R"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$R" && find . | sort | cpio --reproducible -o -H newc -R 0:0 --quiet) > "$WORK/initrd.img"
cp "$WORK/k/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

# 3. data disk: raw ext4 populated from a directory
D=$WORK/diskroot; mkdir -p "$D"
echo "nephele test guest data disk" > "$D/README"
head -c $((8 * 1048576)) /dev/zero | tr '\0' 'B' > "$D/base.bin"   # compressible base data
find "$D" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mke2fs -q -t ext4 -d "$D" -L nephele -U 6e657068-656c-6500-0000-000000000001 \
  -E hash_seed=6e657068-656c-6500-0000-000000000002,root_owner=0:0,lazy_itable_init=0,nodiscard \
  -O ^has_journal "$WORK/disk.raw" ${DISK_MB}M
# mke2fs -d copies each file's ctime, which touch cannot set: pin it with debugfs
(cd "$D" && find . -mindepth 1 | sed 's#^\.##' | while read -r f; do echo "sif $f ctime @$SOURCE_DATE_EPOCH"; done) \
  > "$WORK/debugfs.cmds"
debugfs -w -f "$WORK/debugfs.cmds" "$WORK/disk.raw" >/dev/null 2>&1

for f in vmlinuz initrd.img disk.raw VERSIONS; do mv "$WORK/$f" "$OUT/$f"; done
