#!/bin/bash
# Runs inside the test VM (started by /sbin/icr-vm-init from the host's run
# directory, mounted at /run/icr-vm): mounts the host's workspace (the test
# captures are in it) at the same path as on the host (the test binaries have those paths built
# in), then runs each test binary of tests.list and prints a summary.
# Exit status: 0 when every test binary passed.
#
# run.env (written by `cargo xtask vm-test`): ICR_VM_ROOT, ICR_VM_TARGET (cargo's
# target directory; ICR_VM_TARGET_SHARED=1 when it is outside ICR_VM_ROOT and
# shared on its own), ICR_VM_BIN (the `icr` built for the guest's architecture),
# ICR_VM_TEST_TIMEOUT (seconds per test binary), ICR_VM_TEST_ARGS, and the
# tests' own settings when set on the host (ICR_FAILOPEN_FRAMES, ICR_LAB_LOG,
# ICR_LAB_SLOWDOWN, which xtask sets to 4 under TCG), and ICR_VM_PACKAGE_TEST=1
# for `--only package` (package-test.sh in the run directory, not tests.list).
# tests.list: one test binary a line: NAME<TAB>DIRECTORY<TAB>EXECUTABLE<TAB>ARGS
# (its own arguments, test filters, before ICR_VM_TEST_ARGS; may be empty).
set -u
ctl=/run/icr-vm
# shellcheck source=/dev/null
. "$ctl/run.env"

share() { # TAG PATH
    mkdir -p "$2" && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose "$1" "$2"
}
share icrroot "$ICR_VM_ROOT" || { echo "guest-run: cannot mount the workspace at $ICR_VM_ROOT"; exit 120; }
if [ "${ICR_VM_TARGET_SHARED:-0}" = 1 ]; then
    share icrtarget "$ICR_VM_TARGET" || { echo "guest-run: cannot mount the target directory at $ICR_VM_TARGET"; exit 120; }
fi

echo "guest-run: kernel $(uname -r) ($(uname -v))"
features() {
    local have=()
    [ -e /sys/kernel/btf/vmlinux ] && have+=(btf) || have+=(no-btf)
    grep -qw bpf /proc/filesystems && have+=(bpffs)
    echo "guest-run: features: ${have[*]}; unprivileged_bpf_disabled=$(cat /proc/sys/kernel/unprivileged_bpf_disabled 2>/dev/null)"
}
features

# `vm-test --only package`: the Debian package under systemd, not the test binaries.
if [ -n "${ICR_VM_PACKAGE_TEST:-}" ]; then
    start=$(date +%s)
    echo "ICR-VM-TEST-START: package"
    timeout -k 10 "${ICR_VM_TEST_TIMEOUT:-1200}" bash "$ctl/package-test.sh"
    code=$?
    echo "ICR-VM-TEST-END: package exit=$code seconds=$(( $(date +%s) - start ))"
    exit "$code"
fi

export ICR_BIN="${ICR_VM_BIN:-${ICR_VM_TARGET:-$ICR_VM_ROOT/target}/debug/icr}"
export ICR_LAB_PYTHON=/opt/icr-lab-python/bin/python3
export RUST_BACKTRACE=1
"$ICR_BIN" --version 2>&1 | sed 's/^/guest-run: /'

read -r -a extra_args <<< "${ICR_VM_TEST_ARGS:-}"
passed_bins=0
failed_bins=()
while IFS=$'\t' read -r name dir exe own; do
    [ -n "$name" ] || continue
    read -r -a own_args <<< "${own:-}"
    echo "ICR-VM-TEST-START: $name"
    start=$(date +%s)
    (cd "$dir" && exec timeout -k 10 "${ICR_VM_TEST_TIMEOUT:-1200}" "$exe" "${own_args[@]}" "${extra_args[@]}")
    code=$?
    took=$(( $(date +%s) - start ))
    echo "ICR-VM-TEST-END: $name exit=$code seconds=$took"
    if [ "$code" = 0 ]; then passed_bins=$((passed_bins + 1)); else failed_bins+=("$name"); fi
done < "$ctl/tests.list"

echo "guest-run: test binaries passed: $passed_bins, failed: ${#failed_bins[@]} ${failed_bins[*]:-}"
# Leftovers would say a test does not clean up after itself.
left=$(ip netns list 2>/dev/null | wc -l)
[ "$left" = 0 ] || echo "guest-run: $left network namespaces left: $(ip netns list | tr '\n' ' ')"
[ ${#failed_bins[@]} = 0 ]
