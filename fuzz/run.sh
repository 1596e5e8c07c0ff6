#!/usr/bin/env bash
# Runs one fuzz target for a bounded time on the stable toolchain (no sanitizer), with its
# seeds when it has any. Needs `cargo install cargo-fuzz`.
#   fuzz/run.sh TARGET [SECONDS]       (default 600)
set -euo pipefail
cd "$(dirname "$0")"
target=$1
seconds=${2:-600}
mkdir -p "corpus/$target"
seeds=()
[ -d "seeds/$target" ] && seeds=("seeds/$target")
exec cargo fuzz run -s none "$target" "corpus/$target" "${seeds[@]}" -- -max_total_time="$seconds" -print_final_stats=1
