#!/usr/bin/env bash
# Regenerate the install script of a released version from the commit it was released at, and
# compare it with the fixture kept in tests/upgrade/ (or write it there with --write). The
# fixtures are generated, never edited: this is how one is made, and how to check one.
#
#   tests/upgrade/regenerate-fixture.sh 0.1.0 c6fbb03 [--write]
#
# Builds that commit in a temporary worktree with cargo-pgrx against PostgreSQL 15 (a few
# minutes; a target directory of its own, target/fixtures: sharing the main one would leave the
# old build's library where cargo looks for the current one). Needs what scripts/test.sh installs.
set -euo pipefail
VERSION=${1:?usage: regenerate-fixture.sh VERSION COMMIT [--write]}
COMMIT=${2:?usage: regenerate-fixture.sh VERSION COMMIT [--write]}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../../scripts/common.sh"
FIXTURE="$HERE/pgflow--$VERSION.sql"

work=$(mktemp -d)
trap 'git -C "$REPO_ROOT" worktree remove --force "$work/src" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$REPO_ROOT" worktree add --detach "$work/src" "$COMMIT" >/dev/null
version=$(sed -nE 's/^version = "(.*)"/\1/p' "$work/src/Cargo.toml" | head -1)
[ "$version" = "$VERSION" ] || { echo "commit $COMMIT is version $version, not $VERSION" >&2; exit 1; }
(cd "$work/src" && CARGO_TARGET_DIR="$REPO_ROOT/target/fixtures" cargo pgrx schema pg15 --release \
    --pg-config /usr/lib/postgresql/15/bin/pg_config --out "$work/pgflow--$VERSION.sql" >/dev/null)

if [ "${3:-}" = --write ]; then
    cp "$work/pgflow--$VERSION.sql" "$FIXTURE"
    echo "wrote $FIXTURE"
elif cmp -s "$work/pgflow--$VERSION.sql" "$FIXTURE"; then
    echo "$FIXTURE is the install script of $COMMIT"
else
    diff -u "$FIXTURE" "$work/pgflow--$VERSION.sql" | head -50
    echo "$FIXTURE differs from the install script generated at $COMMIT" >&2
    exit 1
fi
