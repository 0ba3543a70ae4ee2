#!/usr/bin/env bash
# make conformance: the tuf-conformance suite against the device's repository client
# (scripts/tuf-conformance-client -> edgeota.agent.conformance).
#
# The suite is not on PyPI: it needs a checkout of theupdateframework/tuf-conformance
# at TUF_CONFORMANCE_DIR (default: build/tuf-conformance, then /opt/tuf-conformance).
# Without one this says so and exits 0 when CONFORMANCE_OPTIONAL=1 (CI on a machine
# that has none), 2 otherwise. It installs Debian's faketime when missing, makes its
# own venv (the suite pins its own tuf and pytest), runs the suite and prints the
# pass count with the expected failures (scripts/tuf-conformance-client.xfails).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${TUF_CONFORMANCE_DIR:-}"
if [ -z "$dir" ]; then
  for candidate in build/tuf-conformance /opt/tuf-conformance; do
    if [ -d "$candidate/tuf_conformance" ]; then dir="$candidate"; break; fi
  done
fi
if [ -z "$dir" ] || [ ! -d "$dir/tuf_conformance" ]; then
  echo "tuf-conformance: no checkout found (set TUF_CONFORMANCE_DIR to a checkout of" \
       "theupdateframework/tuf-conformance, or put one at build/tuf-conformance)"
  [ "${CONFORMANCE_OPTIONAL:-0}" = 1 ] && exit 0 || exit 2
fi
if ! command -v faketime >/dev/null 2>&1; then
  echo "installing faketime (Debian package, the suite moves the client's clock with it)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
fi
venv=build/conformance-venv
if [ ! -x "$venv/bin/pytest" ] || [ "$dir/pyproject.toml" -nt "$venv/.installed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$dir"
  touch "$venv/.installed"
fi
entry="$PWD/scripts/tuf-conformance-client"
report=build/conformance-report.json
set +e
(cd "$dir" && "$OLDPWD/$venv/bin/pytest" tuf_conformance --entrypoint "$entry" \
   -p no:cacheprovider -q -rfEx --json-report --json-report-file="$OLDPWD/$report" \
   --json-report-omit collectors log keywords streams) | tail -n 25
status=${PIPESTATUS[0]}
set -e
"$venv/bin/python" - "$report" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]
keys = ("passed", "failed", "xfailed", "xpassed", "error", "skipped")
counts = ", ".join(f"{summary.get(k, 0)} {k}" for k in keys if summary.get(k))
print(f"tuf-conformance: {counts} of {summary.get('total', 0)}")
PY
exit "$status"
