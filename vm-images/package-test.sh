#!/bin/bash
# The Debian package, as an operator uses it, in the test VM booted with
# systemd (`cargo xtask vm-test --only package`; guest-run.sh runs this from
# the host's run directory, /run/icr-vm, which holds icr-installed.deb and
# icr-upgrade.deb, a newer build of the same code).
#
# The VM is the gateway: a client namespace behind it (lan0), a server
# namespace beyond (wan0, NAT). Install; check the user, group, directories
# and that nothing starts; name the interfaces; start the unit; check the
# agent's user and capabilities; traffic; upgrade during a download (the
# agent restarts, the pinned probe counts on: no gap, the download counted
# byte for byte); a question asked by a member of icr-query, refused to
# another user; removal (the store kept, the probe detached); purge (what it
# says it removes, removed). Then which capabilities the agent needs on
# this kernel: it is started under setpriv, as icr, with each set in turn.
#
# Prints "test result: ok. N passed; M failed; 0 ignored" (xtask counts it)
# and exits 0 when every check passed.
set -u
ctl=/run/icr-vm
started=$(date +%s)
passed=0
failed=0
say() { echo "package-test: [$(($(date +%s) - started)) s] $*"; }
check() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        say "ok: $what"
    else
        failed=$((failed + 1))
        say "FAILED: $what"
    fi
}
finish() {
    echo "test result: $([ "$failed" = 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; 0 ignored"
    [ "$failed" = 0 ]
    exit
}
# Polls COMMAND every half second for at most SECONDS.
wait_for() { # SECONDS COMMAND...
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

client=icrpkg-client
server=icrpkg-server
www=/var/tmp/icrpkg-www
server_pid=
slow_pid=
cleanup() {
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null
    [ -z "$slow_pid" ] || kill "$slow_pid" 2>/dev/null
    ip netns pids "$server" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns pids "$client" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$client" 2>/dev/null
    ip netns del "$server" 2>/dev/null
    ip link del capl0 2>/dev/null
    ip link del capw0 2>/dev/null
    nft delete table ip icrpkg 2>/dev/null
    rm -rf "$www"
}
trap cleanup EXIT

# The lab, as tests/lab builds it: documentation addresses, NAT to one
# public address.
lan_net=192.168.50
public_ip=203.0.113.1
server_ip=198.51.100.20
ip netns add "$client"
ip netns add "$server"
ip link add lan0 type veth peer name eth0 netns "$client"
ip link add wan0 type veth peer name eth0 netns "$server"
ip addr add "$lan_net.1/24" dev lan0
ip addr add "$public_ip/24" dev wan0
ip link set lan0 up
ip link set wan0 up
ip -n "$client" addr add "$lan_net.2/24" dev eth0
ip -n "$client" link set lo up
ip -n "$client" link set eth0 up
ip -n "$client" route add default via "$lan_net.1"
ip -n "$server" addr add "$server_ip/24" dev eth0
ip -n "$server" addr add 203.0.113.254/24 dev eth0
ip -n "$server" link set lo up
ip -n "$server" link set eth0 up
sysctl -qw net.ipv4.ip_forward=1
ip route add "$server_ip/32" via 203.0.113.254 dev wan0
nft -f - <<'NFT'
table ip icrpkg {
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade
    }
}
NFT
mkdir -p "$www"
head -c 20000 /dev/urandom > "$www/small"
ip netns exec "$server" python3 -m http.server 8080 --bind "$server_ip" --directory "$www" > /dev/null 2>&1 &
server_pid=$!
# The download that spans the upgrade: 10 kB a second for 150 s, whatever
# the emulation's speed, from a server that paces it.
big_bytes=1500000
ip netns exec "$server" python3 -c '
import socket, time
server = socket.create_server(("'"$server_ip"'", 9000))
connection, _ = server.accept()
for _ in range(150):
    connection.sendall(b"x" * 10000)
    time.sleep(1)
connection.close()
' > /dev/null 2>&1 &
slow_pid=$!
wait_for 30 ip netns exec "$client" curl -sf -o /dev/null "http://$server_ip:8080/small" ||
    { say "the lab's server does not answer"; finish; }
say "lab up: client $lan_net.2 -> lan0 | gateway (NAT $public_ip) | wan0 -> server $server_ip"

# --- Install ---------------------------------------------------------------
out=$(dpkg -i "$ctl/icr-installed.deb" 2>&1)
status=$?
echo "$out" | sed 's/^/  dpkg: /'
check "dpkg -i installs the package" [ "$status" = 0 ]
check "the package says what to do next" grep -q "systemctl enable --now icr" <<< "$out"
check "the user icr exists, a system user without a login" \
    bash -c '[ "$(getent passwd icr | cut -d: -f7)" = /usr/sbin/nologin ] && [ "$(id -u icr)" -lt 1000 ]'
check "the group icr-query exists" getent group icr-query
check "/run/icr: icr:icr-query 2750" [ "$(stat -c '%U:%G %a' /run/icr)" = "icr:icr-query 2750" ]
check "/sys/fs/bpf/icr: icr's, 0700" [ "$(stat -c '%U %a' /sys/fs/bpf/icr)" = "icr 700" ]
check "/etc/icr/icr.toml is a conffile" grep -qx /etc/icr/icr.toml /var/lib/dpkg/info/icr.conffiles
check "the unit is installed, not started" bash -c '! systemctl is-active -q icr'
size=$(stat -c %s "$ctl/icr-installed.deb")
say "package size: $size bytes; installed: $(dpkg-query -W -f '${Installed-Size}' icr) KiB"

# --- Configure and start -------------------------------------------------
# The interfaces and a test authority. (Until every command reads
# /etc/icr/icr.toml's db and [capture], a drop-in names them.)
cat > /etc/icr/icr.toml <<'TOML'
socket = "/run/icr/icr.sock"

[probe]
pin_dir = "/sys/fs/bpf/icr"
flow_table_size = 65536

[timeouts]
tcp_closed = "1s"
udp_idle = "2s"
full_sweep = "1s"

[[authority]]
name = "met"
kind = "police"
purposes = [1, 2, 3]
TOML
mkdir -p /etc/systemd/system/icr.service.d
cat > /etc/systemd/system/icr.service.d/lab.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=/usr/bin/icr run --lan lan0 --wan wan0 --db /var/lib/icr --config /etc/icr/icr.toml
UNIT
systemctl daemon-reload
since=$(date '+%Y-%m-%d %H:%M:%S')
from=$(date -u +%Y-%m-%dT%H:%M:%SZ)
systemctl start icr
running() { journalctl -q -u icr --since "$since" -o cat | grep -q "icr running"; }
check "the unit starts and the agent runs" wait_for 180 running
journalctl -q -u icr --since "$since" -o cat | sed 's/^/  icr: /'
pid=$(systemctl show -p MainPID --value icr)
check "the agent runs as icr" [ "$(ps -o user= -p "$pid")" = icr ]
# CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39), no other: the unit
# grants CAP_SYS_ADMIN (21) too, which the agent drops once its setup is
# done. Capabilities are a thread's: every thread is checked.
agent_caps() { # PID: every thread's sets, without CAP_SYS_ADMIN
    local task
    for task in /proc/"$1"/task/*; do
        for set in CapInh CapPrm CapEff CapAmb; do
            [ "$(awk -v set="$set:" '$1 == set {print $2}' "$task/status")" = 000000c000001000 ] ||
                { say "thread ${task##*/} ($(cat "$task/comm")): $(grep "^$set" "$task/status")"; return 1; }
        done
    done
}
check "the agent's capabilities, every thread's: CAP_BPF CAP_NET_ADMIN CAP_PERFMON" agent_caps "$pid"
say "the agent's threads: $(ls /proc/"$pid"/task | wc -l)"
grep '^Cap' /proc/"$pid"/status | sed 's/^/  agent: /'
# Which event buffers this kernel gives the probe: the per-CPU perf buffers
# (perf_event_open, which CAP_SYS_ADMIN alone opens at Debian's
# kernel.perf_event_paranoid 3) or BPF ring buffers.
if journalctl -q -u icr --since "$since" -o cat | grep -q "events through the per-CPU perf buffers"; then
    events=perf
else
    events=ring
fi
say "events through: $events buffers; kernel.perf_event_paranoid $(sysctl -n kernel.perf_event_paranoid)"
check "the store is /var/lib/icr, icr's, 0700" [ "$(stat -c '%U %a' /var/lib/icr)" = "icr 700" ]
check "the maps and links are pinned" test -e /sys/fs/bpf/icr/FLOWS -a -e /sys/fs/bpf/icr/link-lan0
check "the query socket is icr-query's, 0660" [ "$(stat -c '%G %a' /run/icr/icr.sock)" = "icr-query 660" ]

# --- Traffic, and an upgrade in the middle of a download --------------------
for _ in 1 2 3; do ip netns exec "$client" curl -sf -o /dev/null "http://$server_ip:8080/small"; done
ip netns exec "$client" python3 -c '
import socket, sys
client = socket.create_connection(("'"$server_ip"'", 9000), source_address=("", 40001))
received = 0
while data := client.recv(65536):
    received += len(data)
open("/var/tmp/icrpkg-big", "w").write(str(received))
' &
download=$!
sleep 5
upgrade_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
since=$(date '+%Y-%m-%d %H:%M:%S')
out=$(dpkg -i --force-confold "$ctl/icr-upgrade.deb" 2>&1)
status=$?
echo "$out" | sed 's/^/  dpkg: /'
check "dpkg -i upgrades to the newer build" [ "$status" = 0 ]
check "the newer version is installed" \
    bash -c '[[ "$(dpkg-query -W -f "\${Version}" icr)" == *+upgrade1 ]]'
check "the upgrade restarted the agent" wait_for 180 running
new_pid=$(systemctl show -p MainPID --value icr)
check "a new agent process" test "$new_pid" != "$pid" -a "$new_pid" != 0
check "the new agent's capabilities, every thread's: CAP_BPF CAP_NET_ADMIN CAP_PERFMON" agent_caps "$new_pid"
check "the new agent took over the pinned probe" \
    bash -c "journalctl -q -u icr --since '$since' -o cat | grep -q 'took over the pinned XDP link of lan0'"
journalctl -q -u icr --since "$since" -o cat | sed 's/^/  icr: /'
check "the download was still going when the new agent ran" kill -0 "$download"
check "the download spanning the upgrade completed" wait "$download"
check "the download is whole" [ "$(cat /var/tmp/icrpkg-big)" = "$big_bytes" ]
ip netns exec "$client" curl -sf -o /dev/null "http://$server_ip:8080/small"
sleep 8 # closed (tcp_closed 1s), swept and stored
to=$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ)

# --- A question, by a member of icr-query; refused to another user ---------
useradd --system --no-create-home officer
usermod -aG icr-query officer
ask() { # USER QUESTION ARGS...
    local user=$1
    shift
    runuser -u "$user" -- icr query "$@" --db /var/lib/icr --config /etc/icr/icr.toml \
        --authority met --officer "PC 1" --reference OP-PKG-1 --format ndjson
}
ask officer resolve --ip "$public_ip" --port 40001 --at "$upgrade_at" --tolerance 5m \
    > /var/tmp/icrpkg-resolve 2> /var/tmp/icrpkg-resolve.err
status=$?
sed 's/^/  query: /' /var/tmp/icrpkg-resolve /var/tmp/icrpkg-resolve.err
check "a member of icr-query asks the running agent (question 1)" [ "$status" = 0 ]
check "no capture gap across the upgrade" bash -c '! grep -q "capture gap" /var/tmp/icrpkg-resolve.err'
ask officer services --device "$lan_net.2" --from "$from" --to "$to" > /var/tmp/icrpkg-services 2>&1
sed 's/^/  services: /' /var/tmp/icrpkg-services
check "question 2 names the server" grep -q "$server_ip" /var/tmp/icrpkg-services
# Every byte of the download spanning the upgrade, in the service's total
# over its records (the SIGTERM closes it as "shutdown", the next agent
# records the rest): the payload and at most 20 % of headers and ACKs.
counted() {
    python3 - "$big_bytes" /var/tmp/icrpkg-services <<'PY'
import json, sys
size = int(sys.argv[1])
rows = [json.loads(line) for line in open(sys.argv[2]) if line.startswith("{")]
row = [r for r in rows if str(r.get("remote", "")).endswith(":9000")]
print(f"  the download's service: {row}")
sys.exit(0 if len(row) == 1 and size <= int(row[0]["bytes"]) <= size * 1.2 else 1)
PY
}
check "the download spanning the upgrade is counted, every byte" counted
ask nobody services --device "$lan_net.2" --from "$from" --to "$to" > /var/tmp/icrpkg-nobody 2>&1
status=$?
sed 's/^/  nobody: /' /var/tmp/icrpkg-nobody
check "a user outside icr-query is refused" [ "$status" != 0 ]

# --- Which capabilities the agent needs on this kernel ----------------------
# The agent as icr under setpriv (the sets inheritable, ambient and bounding)
# and prlimit (RLIMIT_MEMLOCK), on interfaces of its own (the pinned probe
# holds lan0 and wan0), with a store and the shipped flow table size; it
# runs when it logs "icr running".
ip link add capl0 type veth peer name capl1
ip link add capw0 type veth peer name capw1
for link in capl0 capl1 capw0 capw1; do ip link set "$link" up; done
# The agent on capl0/capw0 with a store in DIR; exits 0 once it logs
# "icr running" (then stopped by SIGINT), 1 if it exits before.
cat > /usr/local/bin/icrpkg-try <<'SCRIPT'
#!/bin/bash
icr run --lan capl0 --wan capw0 --db "$1/db" --config "$1.toml" > "$1/log" 2>&1 &
for _ in $(seq 240); do
    if grep -q "icr running" "$1/log"; then
        grep '^Cap' /proc/$!/status | tr '\n' ' ' > "$1/caps"
        kill -INT $!
        wait $!
        exit 0
    fi
    kill -0 $! 2>/dev/null || { wait $!; exit 1; }
    sleep 0.5
done
kill -9 $!
exit 2
SCRIPT
chmod 755 /usr/local/bin/icrpkg-try
try_caps() { # LIMIT_MEMLOCK (bytes or unlimited) CAP...
    local memlock=$1
    shift
    local dir code names
    names=$(printf ',+%s' "$@" | tr 'A-Z' 'a-z' | sed 's/cap_//g')
    dir=$(mktemp -d /var/tmp/icrpkg-caps.XXXXXX)
    chown icr: "$dir"
    # Root's, as a configuration that authorises questions must be.
    printf 'socket = "%s/icr.sock"\n[probe]\nflow_table_size = 1048576\n' "$dir" > "$dir.toml"
    prlimit --memlock="$memlock:$memlock" \
        setpriv --reuid=icr --regid=icr --init-groups --inh-caps="-all$names" \
        --ambient-caps="-all$names" --bounding-set="-all$names" \
        /usr/local/bin/icrpkg-try "$dir" < /dev/null > "$dir.run" 2>&1
    code=$?
    say "caps [$*] memlock $memlock: $([ "$code" = 0 ] && echo runs || echo "fails (exit $code)")"
    # Why it fails (the agent's last words), or what it ran with.
    sed 's/^/    setpriv: /' "$dir.run"
    [ -f "$dir/caps" ] && sed 's/^/    running with: /' "$dir/caps" && echo
    [ -f "$dir/log" ] && [ "$code" != 0 ] && cut -c1-300 "$dir/log" | grep -v " INFO " | sed 's/^/    /'
    rm -rf "$dir" "$dir.run" "$dir.toml"
    return "$code"
}
systemctl stop icr
runs() { try_caps "$@"; }
fails() { ! try_caps "$@"; }
unit_caps=(CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_SYS_ADMIN)
check "the unit's capabilities and memlock: the agent runs" runs unlimited "${unit_caps[@]}"
# CAP_SYS_ADMIN: perf_event_open of the event buffers, nothing else.
if [ "$events" = perf ]; then
    check "without CAP_SYS_ADMIN it fails (perf buffers)" fails unlimited CAP_BPF CAP_NET_ADMIN CAP_PERFMON
else
    check "without CAP_SYS_ADMIN it runs (ring buffers)" runs unlimited CAP_BPF CAP_NET_ADMIN CAP_PERFMON
fi
# Evidence: what each of the others does.
try_caps unlimited CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN
try_caps unlimited CAP_NET_ADMIN CAP_SYS_ADMIN
try_caps unlimited CAP_BPF CAP_NET_ADMIN
try_caps unlimited CAP_NET_ADMIN CAP_PERFMON
try_caps unlimited CAP_BPF CAP_PERFMON CAP_SYS_ADMIN
try_caps 8388608 "${unit_caps[@]}"
try_caps 67108864 "${unit_caps[@]}"
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl start icr
check "the unit starts again" wait_for 180 running

# --- Removal keeps the store; purge removes it ------------------------------
out=$(dpkg -r icr 2>&1)
status=$?
echo "$out" | sed 's/^/  dpkg: /'
check "dpkg -r removes the package" [ "$status" = 0 ]
check "the agent stopped" bash -c '! pgrep -x icr'
check "the store is kept" test -d /var/lib/icr -a -n "$(ls /var/lib/icr)"
check "the removal says the store is kept" grep -q "kept the store /var/lib/icr" <<< "$out"
check "the probe is detached: no pins" bash -c '[ -z "$(ls -A /sys/fs/bpf/icr 2>/dev/null)" ]'
check "the probe is detached: no XDP on lan0" bash -c '! ip link show lan0 | grep -q xdp'
out=$(dpkg -P icr 2>&1)
status=$?
echo "$out" | sed 's/^/  dpkg: /'
check "dpkg -P purges the package" [ "$status" = 0 ]
check "the purge says it removes the store" grep -q "removing /var/lib/icr" <<< "$out"
check "the store is gone" [ ! -e /var/lib/icr ]
check "the configuration is gone" [ ! -e /etc/icr/icr.toml ]
finish
