#!/usr/bin/env bash
# Build the source RPM, neuron-VERSION-RELEASE.src.rpm, from this source tree.
#
#   bash specs/srpm.sh OUTDIR
#
# The SRPM holds exactly what specs/neuron.spec names: the spec, Source0 (an sdist-style
# tarball of the tree, top directory neuron-VERSION/) and Source1 (the sysusers file, which
# the spec needs while it is parsed, before %prep unpacks Source0). The tarball holds what a
# commit of the working tree would: tracked files plus untracked ones git does not ignore,
# so `make srpm` packs local changes and a clean clone (COPR's case) packs the commit.
# Its entries are sorted, owned by root and dated by the last commit, so the same tree gives
# the same tarball.
#
# `make srpm` and `.copr/Makefile` both call this. On a host whose rpm lacks Fedora's
# Python and systemd macros (Debian, where this project's CI runs), specs/fedora-compat.macros
# stands in for them; on Fedora and COPR the real ones are used.
set -euo pipefail

outdir=${1:?usage: specs/srpm.sh OUTDIR}
here=$(cd "$(dirname "$0")/.." && pwd)
spec=$here/specs/neuron.spec

for tool in git tar rpmbuild; do
    command -v "$tool" >/dev/null || { echo "srpm: $tool is needed (dnf install git tar rpm-build)" >&2; exit 1; }
done

version=$(sed -n 's/^Version: *//p' "$spec")
[ -n "$version" ] || { echo "srpm: no Version: in $spec" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/SOURCES" "$outdir"
outdir=$(cd "$outdir" && pwd)

# -c safe.directory: COPR and CI may run this as a user other than the clone's owner.
git_() { git -c safe.directory='*' -C "$here" "$@"; }
stamp=$(git_ log -1 --format=%ct 2>/dev/null || date +%s)
# Deleted-but-still-tracked files are listed by ls-files; keep only what exists.
git_ ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' name; do [ -f "$here/$name" ] && printf '%s\0' "$name"; done \
    | sort -z \
    | tar -C "$here" --no-recursion --transform "s,^,neuron-$version/," \
        --owner=0 --group=0 --numeric-owner --mtime="@$stamp" \
        -cf - --null -T - \
    | gzip -n >"$work/SOURCES/neuron-$version.tar.gz"
cp "$here/systemd/neuron-sysusers.conf" "$work/SOURCES/"

compat=()
if [ -z "$(rpm --eval '%{?pyproject_wheel}')" ]; then
    compat=(--load "$here/specs/fedora-compat.macros")
fi

# -bs only parses the spec and packs it with its sources: nothing is built, so no
# BuildRequires are needed here; they are checked where the SRPM is rebuilt.
rpmbuild -bs --nodeps "${compat[@]}" \
    --define "_topdir $work" \
    --define "_sourcedir $work/SOURCES" \
    --define "_srcrpmdir $outdir" \
    "$spec" >"$work/rpmbuild.log" 2>&1 || { cat "$work/rpmbuild.log" >&2; exit 1; }
sed -n 's/^Wrote: //p' "$work/rpmbuild.log"
