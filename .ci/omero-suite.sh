#!/usr/bin/env bash
# CI step: the OMERO suite (tests/omero) on Python 3.10 with the real omero-py.
#
# omero-py needs zeroc-ice 3.6.5, which builds from source on Python 3.10 only (~7 min on a 2-core machine).
# The built wheel and the environment are cached under ${LPFM_CI_CACHE:-$HOME/.cache/lpfm-ci}, so later runs
# take seconds. torch is never installed here: the connector does not need it, and an unpinned torch would
# resolve to a multi-GB CUDA build. Exits with pytest's status; prints pytest's summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=${LPFM_CI_CACHE:-$HOME/.cache/lpfm-ci}
WHEELS=$CACHE/wheels
VENV=${LPFM_OMERO_VENV:-$CACHE/venv-omero-py310}
ICE=zeroc-ice==3.6.5
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
mkdir -p "$WHEELS"

find_python310() {
  local c
  for c in "${LPFM_PYTHON310:-}" python3.10 "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10 \
           /usr/bin/python3.10 /usr/local/bin/python3.10; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

t0=$(date +%s)
if ! "$VENV/bin/python" -c 'import omero.gateway, Ice, numpy, skimage, shapely, pytest' >/dev/null 2>&1; then
  PY=$(find_python310) || { echo "omero-suite: Python 3.10 not found (set LPFM_PYTHON310)"; exit 2; }
  echo "omero-suite: creating $VENV with $($PY --version)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q wheel "setuptools<70"
  if ! ls "$WHEELS"/zeroc_ice-3.6.5-*cp310*.whl >/dev/null 2>&1; then
    echo "omero-suite: building $ICE from source (several minutes; cached in $WHEELS afterwards)"
    "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation "$ICE" -w "$WHEELS"
  fi
  "$VENV/bin/pip" install -q "$WHEELS"/zeroc_ice-3.6.5-*cp310*.whl
  # everything the connector and its tests import; deliberately no torch, diffusers or openslide
  "$VENV/bin/pip" install -q "omero-py>=5.19" "numpy>=1.24" "scipy>=1.10" "scikit-image>=0.22" \
    "tifffile>=2024.2.12" "imagecodecs>=2024.1.1" "shapely>=2.0" "click>=8.1" "rich>=13" "pillow>=10" \
    "ome-types[lxml]>=0.5" "xmlschema>=3" "PyWavelets>=1.4" "tomli>=1.1" "pytest>=8" "hypothesis>=6.100" "setuptools>=77"
fi
"$VENV/bin/python" -c 'import tomli' >/dev/null 2>&1 || "$VENV/bin/pip" install -q "tomli>=1.1"  # config on 3.10
# this checkout, without dependencies (pip would otherwise resolve torch)
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO"
echo "omero-suite: environment ready in $(( $(date +%s) - t0 )) s ($("$VENV/bin/python" --version), omero-py" \
     "$("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(v("omero-py"), "/ zeroc-ice", v("zeroc-ice"))'))"

status=0
"$VENV/bin/python" -m pytest tests/omero -p no:cacheprovider -q -ra "$@" || status=$?
exit $status
