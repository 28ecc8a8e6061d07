#!/usr/bin/env bash
# The checks a lent GPU machine runs, in one call of the device tool: the wgpu tests on real hardware,
# `bench kernels`, `bench coreset`, `bench backbone`, `bench bank`, and the demo and a PatchCore eval on
# wgpu against the same eval on the CPU. Such a machine is bare and its time is short, so nothing is built
# there: build and pack here, then carry the pack.
#
# Prepare here (x86-64, from the repository root; .dev/ and .gl/ are ignored through .git/info/exclude):
#   cargo build --release && cargo test --release --test it --no-run
#   mkdir -p .dev && strip -o .dev/anomaly target/release/anomaly && strip -o .dev/it target/release/deps/it-HASH
#   xz -9 -T2 .dev/anomaly .dev/it          # ~13 MB each: what travels is limited to 64 MiB
#   pwd >.dev/built_in                      # where the test binary looks for fixtures and the CLI
#   the Vulkan loader as .deb files in .gl/ (the device tool's README gives the apt-get line)
# Run there: carry [".dev", ".gl", "weights/efficientnet-lite0-57934424.pth"], command
# `bash tools/device_check.sh`, and a timeout with room for the steps' limits below (about 9 minutes).
#
# Each step writes its log under $OUT (at most 8 files come back) and has its own time limit, so one slow
# step leaves the others' figures. SMALL=1 runs the same steps on tiny sizes and the CPU, to try the
# script on a machine without a GPU first.
set -u
OUT=${OUT:-/tmp/device-out}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
started=$(date +%s)
log() { echo "== $* (+$(($(date +%s) - started)) s)"; }

# Runs `$@` with a limit of $2 seconds, its output in $OUT/$1.txt, and prints the log's last lines.
step() {
    local name=$1 limit=$2
    shift 2
    log "$name: $*"
    local begun=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "rc $rc after $(($(date +%s) - begun)) s" | tee -a "$OUT/$name.txt"
    tail -n "${TAIL:-4}" "$OUT/$name.txt" | head -n -1
}

log setup
if [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
for f in .dev/*.xz; do [ -f "$f" ] && xz -d -f "$f"; done
chmod +x .dev/anomaly .dev/it
# The test binary names its fixtures, its scratch folder and the CLI binary by the paths it was built in.
built=$(cat .dev/built_in)
if [ -n "$built" ] && [ ! -e "$built" ]; then
    mkdir -p "$(dirname "$built")"
    ln -s "$PWD" "$built"
fi
mkdir -p target/release target/tmp
[ "$(realpath .dev/anomaly)" = "$(realpath target/release/anomaly 2>/dev/null)" ] || cp .dev/anomaly target/release/anomaly
export XDG_RUNTIME_DIR=/tmp/xdg-runtime
mkdir -p -m 700 "$XDG_RUNTIME_DIR"
anomaly=.dev/anomaly

log devices
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/devices.txt" 2>&1
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-160 >>"$OUT/devices.txt"
$anomaly devices >>"$OUT/devices.txt" 2>&1
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ "$SMALL" = 0 ] && ! grep -q 'NVIDIA.*Vulkan' "$OUT/devices.txt" && [ -f "$icd" ]; then
    export VK_DRIVER_FILES=$icd __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    echo "with VK_DRIVER_FILES=$icd:" >>"$OUT/devices.txt"
    $anomaly devices >>"$OUT/devices.txt" 2>&1
fi
cat "$OUT/devices.txt"

if [ "$SMALL" = 0 ]; then
    device=wgpu
    kernels=()
    coreset=(--max-picks 1000)
    demo=()
    bank=()
else
    device=cpu
    kernels=(--banks 3000 --dims 128 --ks 1,9 --queries 100 --naive-bank 500)
    coreset=(--patches 20000 --ratio 0.01 --max-picks 50 --repeats 1)
    demo=(--train 12 --test-good 4 --per-defect 2 --k 5)
    bank=(--rows 20000 --queries 50)
fi

step tests 120 .dev/it kernels:: patchcore:: detector:: efficientnet:: backbone:: autoencoder::training
TAIL=6 step kernels 200 $anomaly bench kernels --device wgpu "${kernels[@]}"
TAIL=12 step coreset 60 $anomaly bench coreset --device wgpu "${coreset[@]}"

demo_dir=/tmp/anomaly-demo
rm -rf "$demo_dir"
TAIL=3 step demo 90 $anomaly demo --device "$device" --offline --out "$demo_dir" "${demo[@]}"
TAIL=12 step backbone 60 bash -c "for b in 8 32; do $anomaly bench backbone --device $device --offline --data $demo_dir/data/train/good --batch-size \$b --repeats 5; done"
TAIL=3 step eval 120 bash -c "for d in $device cpu; do echo \"-- patchcore on \$d\"; $anomaly eval --method patchcore --device \$d --offline --data $demo_dir/data --report /tmp/patchcore-\$d; done"
TAIL=8 step bank 90 $anomaly bench bank --device "$device" --dir /tmp "${bank[@]}"
log done
grep -h -e "-- patchcore" -e AUROC "$OUT/demo.txt" "$OUT/eval.txt"
