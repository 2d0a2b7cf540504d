#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while on its committed seed corpus, as CI does:
#   scripts/fuzz.sh [seconds-per-target] [target...]      (default 60 s, every target)
# Installs cargo-fuzz if missing, builds all targets once (AddressSanitizer), then runs each
# target in turn. New corpus entries go to a scratch directory, so the checkout stays clean;
# the committed fuzz/corpus/<target>/ is only read. Fails if any target finds a crash, a leak
# or a timeout, printing the reproducer's path (under fuzz/artifacts/<target>/).
#
# No nightly toolchain is needed: RUSTC_BOOTSTRAP=1 lets the stable compiler accept the
# -Z flags cargo-fuzz passes. The stable toolchain is selected explicitly so a nightly that
# happens to be installed locally does not hide a problem CI would have.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [seconds-per-target] [target...]" >&2
  exit 2
fi

export RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

shift $(($# > 0 ? 1 : 0))

cd fuzz
mapfile -t known < <(cargo fuzz list)
if [ "$#" -gt 0 ]; then
  targets=("$@")
  for target in "${targets[@]}"; do
    if ! printf '%s\n' "${known[@]}" | grep -qx -- "$target"; then
      echo "unknown fuzz target '$target'; the targets are: ${known[*]}" >&2
      exit 2
    fi
  done
else
  targets=("${known[@]}")
fi
echo "== building ${#targets[@]} fuzz targets ($(rustc --version))"
cargo fuzz build

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

failed=()
for target in "${targets[@]}"; do
  corpus="$scratch/corpus/$target"
  log="$scratch/$target.log"
  mkdir -p "$corpus" "artifacts/$target"
  echo "== fuzz $target for ${seconds} s"
  # The first corpus directory receives new inputs; the committed one is read only.
  if cargo fuzz run "$target" "$corpus" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=25 -print_final_stats=1 >"$log" 2>&1; then
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    # libFuzzer's last status line: "#N DONE cov: C ft: F corp: I/SIZE ..."
    final="$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 | sed 's/^#[0-9]*[[:space:]]*DONE[[:space:]]*//')"
    echo "   ok: ${runs:-?} runs (${speed:-?}/s), $(find "$corpus" -type f | wc -l) new corpus entries; ${final:-no final stats}"
  else
    failed+=("$target")
    echo "   FAILED: $target found a problem; libFuzzer's report:"
    # From the panic message or sanitizer report on, without cargo-fuzz's own backtrace.
    awk '/panicked at|==ERROR|^SUMMARY:|ALARM: working on the last Unit/ { p = 1 }
         /^Stack backtrace:$/ { p = 0 }
         p && n < 60 { print; n++ }' "$log" | sed 's/^/   | /'
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    if [ -n "$artifact" ]; then
      echo "   reproducer: fuzz/${artifact#"$PWD/"}"
      echo "   replay it:  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo +stable fuzz run $target ${artifact#"$PWD/"})"
    fi
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "== fuzzing failed: ${failed[*]}" >&2
  exit 1
fi
echo "== fuzzing passed: ${targets[*]} (${seconds} s each)"
