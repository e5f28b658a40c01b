#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time, one after the other,
# one process each, and prints one summary line per target.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      default 600 s per target, every target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Only stable Rust is assumed:
# RUSTC_BOOTSTRAP=1 lets it pass the -Z flags libFuzzer instrumentation needs.
# Generated inputs go to fuzz/work/<target> (not committed); the committed seeds in
# fuzz/corpus/<target> are only read. Crashes land in fuzz/artifacts/<target>/.
# FUZZ_NO_BUILD=1 skips the build step (binaries already built).
set -u
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="target/$triple/release"
if [ -z "${FUZZ_NO_BUILD:-}" ]; then
    for t in "${targets[@]}"; do
        cargo fuzz build --sanitizer none --debug-assertions "$t" || exit 1
    done
fi
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "artifacts/$t" "logs"
    log="logs/$t.log"
    dict=()
    [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
    before=$(find "artifacts/$t" -type f | wc -l)
    start=$(date +%s)
    "$bin_dir/$t" "work/$t" "corpus/$t" "${dict[@]}" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    crashes=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
    [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ] && crashes=1
    [ "$crashes" -ne 0 ] && status=1
    line="$t: ${elapsed}s, ${runs:-?} runs, $crashes crashes (exit $rc, log fuzz/$log)"
    echo "$line"
    summary+=("$line")
done
echo "== summary =="
printf '%s\n' "${summary[@]}"
exit $status
