#!/usr/bin/env bash
# The README's commands on a fresh clone with the base install (issue 8.3): clone this branch
# into a temporary directory, run `bash scripts/setup.sh` there (no --tests), then every
# example command of the README, each checked for its exit status and for no traceback.
#   bash scripts/check_readme.sh            the checked-out branch of this repository
#   bash scripts/check_readme.sh REPO REF   another repository or branch
# It needs the package registries (setup.sh installs from them) and, for measure and the
# real-KVM demo, /dev/kvm (without it those must exit 2). Exits 0 if every command behaved.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="${1:-$here}"
ref="${2:-$(git -C "$here" rev-parse --abbrev-ref HEAD)}"
tmp="$(mktemp -d)"
server=""
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

git clone --quiet --branch "$ref" "$repo" "$tmp/memslots" || exit 1
cd "$tmp/memslots" || exit 1
echo "== bash scripts/setup.sh (fresh clone of $ref)"
bash scripts/setup.sh || { echo "FAIL: setup.sh"; exit 1; }
ms=".venv/bin/memslots"
failures=0
checks=0

# check STATUS CMD...: CMD exits with STATUS and prints no traceback.
check() {
    local want="$1"
    shift
    local shown="$*"
    [ "${#shown}" -gt 160 ] && shown="${shown:0:150}... (${#shown} characters)"
    checks=$((checks + 1))
    "$@" >"$tmp/out" 2>"$tmp/err"
    local got=$?
    if [ "$got" != "$want" ] || grep -q "Traceback" "$tmp/out" "$tmp/err"; then
        failures=$((failures + 1))
        echo "FAIL (exit $got, wanted $want): $shown"
        tail -n 5 "$tmp/err"
    else
        echo "ok   (exit $got): $shown"
    fi
}

kvm=0
[ -r /dev/kvm ] && [ -w /dev/kvm ] && kvm=1
no_kvm=$((kvm ? 0 : 2))
readme_machine=(-m 4G,maxmem=1028G -object memory-backend-ram,id=mem0,size=1T,reserve=off
    -device virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on)

echo "== the first set-up line and the worked example"
check 0 "$ms" demo
check 0 "$ms" demo -accel sim
check 0 "$ms" plan "${readme_machine[@]}" --json
check 0 "$ms" plan "${readme_machine[@]}"
check 0 "$ms" plan "${readme_machine[@]}" --cpu-vendor amd --phys-bits 48 --wide
check 0 "$ms" --help
for verb in plan measure simulate run qmp resize info demo; do
    check 0 "$ms" "$verb" --help
done

echo "== measure"
check "$no_kvm" "$ms" measure --device-size 1T --plugged 1G --repeats 1
check "$no_kvm" "$ms" measure --device-size 64G --plugged 1G --repeats 1 --json

echo "== simulate"
printf 'time,requested-size\n0,1G\n60,8G\n120,2G\n' >"$tmp/trace.csv"
check 0 "$ms" simulate --scenario sawtooth --compare single,dynamic,fixed:1G
check 0 "$ms" simulate --trace "$tmp/trace.csv" --request-log --json
check 0 "$ms" simulate --scenario burst --csv "$tmp/steps.csv"
check 0 test -s "$tmp/steps.csv"
# The base install has no matplotlib: --plots is refused before anything runs (status 2),
# naming the one command that adds it; that command is then true.
check 2 "$ms" simulate --scenario ramp-up --plots "$tmp/plots"
add=$(sed -n 's/.*add it with: //p' "$tmp/err")
echo "     the refusal names: $add"
check 0 test ! -e "$tmp/plots"
check 0 bash -c "$add"
check 0 "$ms" simulate --scenario ramp-up --plots "$tmp/plots"
check 0 test -s "$tmp/plots/simulate-memslots.png"

echo "== run and the client verbs"
sock="$tmp/qmp.sock"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$ms" run "${readme_machine[@]}" -qmp "unix:$sock,server=on,wait=off" --metrics-port "$port" \
    >"$tmp/run.log" 2>&1 &
server=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
check 0 "$ms" qmp "$sock" query-status
check 0 "$ms" qmp "$sock" qom-get path=vmem0 property=size
check 0 "$ms" resize "$sock" vmem0 16G --wait --timeout 60
check 0 "$ms" resize "$sock" vmem0 4G --wait --json
check 0 "$ms" info "$sock" memslots
check 0 "$ms" info "$sock" memslots --all --wide
check 0 "$ms" info "$sock" memory-devices
check 0 "$ms" info "$sock" budget --json
check 0 "$ms" qmp "$sock" x-query-kernel-metadata
check 0 "$ms" qmp "$sock" x-query-virtio-mem-guest id=vmem0
check 0 .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/metrics').read()"
echo "== what must fail with a message, not a traceback"
check 1 "$ms" run "${readme_machine[@]}" -qmp "unix:$tmp/other.sock,server=on,wait=off" \
    --metrics-port "$port"
check 1 "$ms" simulate --scenario burst --csv "$tmp/missing/steps.csv"
check 1 "$ms" resize "$sock" vmem0 1.5M
check 0 "$ms" qmp "$sock" quit
wait "$server"
check 0 test "$?" = 0
server=""
check 1 "$ms" qmp "$sock" query-status
check 1 "$ms" info "$tmp/trace.csv" memslots
check 1 "$ms" plan -m "4G,maxmem=$(printf '1%.0s' $(seq 5000))"
check 1 "$ms" plan -object memory-backend-ram,id=m,size=٤G
check 1 "$ms" plan --kvm-max-memslots 32768

echo "== $((checks - failures)) passed, $failures failed"
[ "$failures" = 0 ]
