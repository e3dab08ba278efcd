# Sourced at the start of a device call (see ../.library/device): installs the carried wheels
# (brotli; the device has none) and points SOURCES at the carried copy of ../shared/data.
#   source bench/device_prelude.sh
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export SOURCES=${SOURCES:-.carry/shared_data} PYTHONUNBUFFERED=1
# small run files (logs, summaries) go back through $OUT; checkpoints stay on the device's disk
keep() { cp "$@" "$OUT"/ 2>/dev/null || true; }
