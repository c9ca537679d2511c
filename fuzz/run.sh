#!/usr/bin/env bash
# Runs the fuzz targets with cargo fuzz (libFuzzer) for a given time each.
#
#   fuzz/run.sh TARGET SECONDS     one of: command write config delta, or `all`
#   fuzz/run.sh build              only build the targets
#
# cargo fuzz needs nightly compiler flags: RUSTC_BOOTSTRAP=1 lets the stable
# toolchain take them. Install it with `cargo install cargo-fuzz --locked`.
#
# Corpora: fuzz/corpus/TARGET/ is checked in (the seeds, made by
# fuzz/make_seeds.py, and every finding); `cargo test` replays it through the
# same checks (tests/fuzz_corpus.rs). libFuzzer adds what it discovers to a
# working corpus under fuzz/target/corpus/TARGET/, which is not checked in.
# A crash or a timeout stops the run with a nonzero status and leaves the
# input in fuzz/artifacts/TARGET/: minimize it (`cargo fuzz tmin TARGET FILE`),
# copy it to fuzz/corpus/TARGET/finding-WHAT, fix the bug, and say what it
# was in the commit.
#
# Every input is bounded in time (-timeout: 10 s is a hang) and memory
# (-rss_limit_mb), and the whole run by -max_total_time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PATH:$HOME/.cargo/bin"
export RUSTC_BOOTSTRAP=1

targets=(command write config delta)
usage() {
    echo "usage: fuzz/run.sh TARGET SECONDS (TARGET: ${targets[*]} or all) | fuzz/run.sh build" >&2
    exit 2
}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

# -a: debug assertions and overflow checks, so an arithmetic overflow is a finding.
# FUZZ_DEV=1 builds unoptimized (--dev): a few times fewer executions per second, but a
# build several times shorter, which is what a short smoke run in CI wants.
profile=()
[[ ${FUZZ_DEV:-} == 1 ]] && profile=(--dev)
build() { cargo fuzz build "${profile[@]}" -a "$@"; }

run_one() {
    local target=$1 seconds=$2 dict max_len
    case $target in
        command) dict=fuzz/dict/command.dict max_len=8192 ;;
        write) dict=fuzz/dict/command.dict max_len=512 ;;
        config) dict=fuzz/dict/config.dict max_len=16384 ;;
        delta) dict=fuzz/dict/delta.dict max_len=8192 ;;
        *) usage ;;
    esac
    local work=fuzz/target/corpus/$target artifacts=fuzz/artifacts/$target
    mkdir -p "$work" "$artifacts" "fuzz/corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # New inputs go to the first corpus directory (the working one); the
    # checked-in one is read.
    cargo fuzz run "${profile[@]}" -a "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" \
        -dict="$dict" -artifact_prefix="$artifacts/" -print_final_stats=1
}

case ${1:-} in
    build) build ;;
    all)
        [[ ${2:-} =~ ^[0-9]+$ ]] || usage
        build
        for t in "${targets[@]}"; do run_one "$t" "$2"; done
        ;;
    command | write | config | delta)
        [[ ${2:-} =~ ^[0-9]+$ ]] || usage
        build "$1"
        run_one "$1" "$2"
        ;;
    *) usage ;;
esac
