#!/usr/bin/env bash
# Runs the whole d7q test suite on a fresh Debian machine: installs what the tests need, then
# checks formatting and lints and runs every test (unit, wire properties, netsim, end-to-end
# against the real binary). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prerequisites of the privileged tests (netsim's TUN link and scenarios, and every test that
# builds a network from namespaces): root and a working /dev/net/tun. Checked once, up front, so
# that a missing one stops the run with its fix instead of letting those tests skip; then
# D7Q_REQUIRE_PRIVILEGED=1 makes any such test that still finds one missing fail, not skip.
if [ "$(id -u)" -ne 0 ]; then
    echo "error: the tests need root (network namespaces, TUN devices); run: sudo $0" >&2
    exit 1
fi
# A character device that opens (`<>` alone would create a plain file where none exists).
tun_usable() { [ -c /dev/net/tun ] && (: <>/dev/net/tun) 2>/dev/null; }
if ! tun_usable; then
    # The driver may be a module not yet loaded, or the device node missing (minimal images).
    if command -v modprobe >/dev/null; then modprobe tun 2>/dev/null || true; fi
    if [ ! -e /dev/net/tun ]; then
        mkdir -p /dev/net && mknod -m 0666 /dev/net/tun c 10 200 || true
    fi
fi
if ! tun_usable; then
    echo "error: /dev/net/tun is missing or unusable and could not be made so;" \
        "load the module (modprobe tun) or, in a container, pass the device" \
        "(docker run --device /dev/net/tun --cap-add NET_ADMIN)" >&2
    exit 1
fi
export D7Q_REQUIRE_PRIVILEGED=1

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v ip >/dev/null || need_apt+=(iproute2)
# The registry tests (tests/registry.rs): a real registry, a real client, htpasswd -B.
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v htpasswd >/dev/null || need_apt+=(apache2-utils)
# The origin tests (tests/nginx.rs): a real HTTPS server nobody here wrote.
command -v nginx >/dev/null || need_apt+=(nginx)
# The Docker-engine tests (tests/docker.rs): dockerd, containerd, runc.
command -v dockerd >/dev/null || need_apt+=(docker.io)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq cargo rustc
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --release --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --locked --workspace -- --test-threads=2

# The fuzz targets (fuzz/, README "Fuzzing"), D7Q_FUZZ_SECS seconds each, when asked for: the
# fuzz crate needs nightly and cargo-fuzz, and building it from scratch takes about 8 minutes on
# 2 cores. Every committed fuzz input is replayed on stable above (tests/fuzz_corpora.rs). New
# inputs go to a scratch directory; the committed corpus is only read.
if [ -z "${D7Q_FUZZ_SECS:-}" ]; then
    echo "== cargo fuzz: not run (D7Q_FUZZ_SECS=20 runs each target for 20 s)"
elif cargo +nightly fuzz --version >/dev/null 2>&1; then
    for t in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
        echo "== cargo fuzz run $t (${D7Q_FUZZ_SECS} s)"
        scratch=$(mktemp -d)
        cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$scratch" "fuzz/corpus/$t" \
            -- -max_total_time="$D7Q_FUZZ_SECS" -print_final_stats=1 2>&1 | tail -n 20
        rm -rf "$scratch"
    done
else
    echo "== cargo fuzz skipped: nightly or cargo-fuzz is not available"
fi
