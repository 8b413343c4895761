#!/bin/bash
# Boots the probe under QEMU microvm (KVM) in several configurations and
# checks its report. Usage: test/qemu-smoke.sh [OUTDIR]   (after make all shim)
out=${1:-$(dirname "$0")/../out}
fail=0
qemu() {
	timeout ${T:-60} qemu-system-x86_64 -M microvm,acpi=on -accel kvm \
		-cpu host,-arch-capabilities -nodefaults -no-user-config \
		-nographic -serial stdio -no-reboot "$@" 2>/dev/null
}
# expect NAME OUTPUT RC WANTED_RC LINE...: every LINE must be in OUTPUT.
expect() {
	local name=$1 output=$2 rc=$3 want_rc=$4 line; shift 4
	for line in "$@"; do
		grep -qxF -- "$line" <<<"$output" || { echo "FAIL $name: no '$line'"; fail=1; return; }
	done
	grep -q "checksum bad" <<<"$output" && { echo "FAIL $name: bad checksum"; fail=1; return; }
	[ "$rc" = "$want_rc" ] || { echo "FAIL $name: exit $rc, want $want_rc"; fail=1; return; }
	echo "ok   $name"
}

for smp in 1 2 4 8; do
	for mem in 128 256 1024 3584; do
		o=$(qemu -smp $smp -m $mem -kernel "$out/probe.elf" -append probe.poweroff)
		expect "pvh smp=$smp mem=$mem" "$o" $? 0 "PROBE start" "PROBE boot pvh" \
			"PROBE acpi_ok yes" "PROBE cpus $smp" "PROBE cpus_up $smp" \
			"PROBE ready" "PROBE poweroff"
	done
done
o=$(T=5 qemu -smp 2 -m 256 -kernel "$out/probe.elf")
expect "idle (killed by timeout)" "$o" $? 124 "PROBE cmdline" "PROBE idle"
o=$(qemu -smp 2 -m 256 -device i8042 -kernel "$out/probe.elf" -append probe.reboot)
expect reboot "$o" $? 0 "PROBE reboot"
o=$(qemu -smp 2 -m 256 -kernel "$out/probe.elf" -append probe.triplefault)
expect triplefault "$o" $? 0 "PROBE triplefault"
o=$(T=5 qemu -smp 1 -m 256 -kernel "$out/probe.elf" -append probe.badinsn)
expect "badinsn (VM stops, killed by timeout)" "$o" $? 124 "PROBE badinsn"

# The Linux entries, through the test shim (QEMU loads the shim by PVH).
load="-device loader,file=$out/probe.bin,addr=0x100000,force-raw=on"
o=$(qemu -smp 4 -m 512 -kernel "$out/shim.elf" $load -append "probe.poweroff")
expect linux64 "$o" $? 0 "PROBE boot linux64" "PROBE cmdline probe.poweroff" \
	"PROBE acpi_ok yes" "PROBE cpus_up 4" "PROBE poweroff"
o=$(qemu -smp 2 -m 512 -kernel "$out/shim.elf" $load -append "shim.scan probe.poweroff")
expect "linux64, RSDP by scan" "$o" $? 0 "PROBE acpi_ok yes" "PROBE cpus_up 2"
o=$(qemu -smp 2 -m 512 -kernel "$out/shim.elf" $load -append "shim.linux32 probe.poweroff")
expect linux32 "$o" $? 0 "PROBE boot linux32" "PROBE cpus_up 2" "PROBE poweroff"

# virtio-blk (QEMU 7.2's virtio-mmio is legacy unless told otherwise).
img=$(mktemp -d)
trap 'rm -rf "$img"' EXIT
blk() {	# blk IMAGE DRIVE_OPTIONS DEVICE_OPTIONS CMDLINE [QEMU ARGS...]
	local file=$1 dopt=$2 devopt=$3 cmd=$4; shift 4
	qemu -smp 1 -m 256 -global virtio-mmio.force-legacy=false "$@" \
		-kernel "$out/probe.elf" -append "$cmd" \
		-drive id=d0,file=$file,format=raw,if=none$dopt \
		-device virtio-blk-device,drive=d0$devopt
}
check() {	# check NAME IMAGE N [FIRST]: the records on the host side
	local name=$1; shift
	python3 "$(dirname "$0")/check-records.py" "$@" >/dev/null ||
		{ echo "FAIL $name: $(python3 "$(dirname "$0")/check-records.py" "$@")"; fail=1; return; }
	echo "ok   $name (image)"
}
truncate -s 1M "$img/a.img"
o=$(blk "$img/a.img" ,cache=none,discard=unmap ,serial=probe-disk-0 \
	"probe.blk_records=20 probe.poweroff")
expect "blk records=20" "$o" $? 0 "PROBE virtio 0 0xfeb02e00 irq 47 id 2" \
	"PROBE virtio_devices 1" "PROBE blk0 capacity 2048 features 0x100006200" \
	"PROBE blk0 serial probe-disk-0" "PROBE acked 19" "PROBE blk_verify ok 20" \
	"PROBE blk_discard ok" "PROBE blk_write_zeroes ok" "PROBE blk_done" \
	"PROBE ready" "PROBE poweroff"
check "blk records=20, records 9-19" "$img/a.img" 20 9
truncate -s 1M "$img/b.img"
o=$(blk "$img/b.img" ,cache=none "" "probe.blk_records=100 probe.blk_nodiscard probe.poweroff")
expect "blk records=100 nodiscard" "$o" $? 0 "PROBE blk0 serial" "PROBE acked 99" \
	"PROBE blk_verify ok 100" "PROBE blk_done" "PROBE poweroff"
grep -q "blk_discard\|blk_write_zeroes" <<<"$o" && { echo "FAIL nodiscard: discarded"; fail=1; }
check "blk records=100 nodiscard" "$img/b.img" 100
o=$(blk "$img/b.img" ,readonly=on "" "probe.blk_readonly_check probe.poweroff")
expect "blk read-only" "$o" $? 0 "PROBE blk_write_status 1" "PROBE blk_done" "PROBE poweroff"
check "blk read-only, image unchanged" "$img/b.img" 100
# Without ACPI, QEMU announces the transport on the command line (and
# there is no S5: stop by triple fault).
o=$(blk "$img/b.img" "" ,discard=off,write-zeroes=off "probe.blk_records=3 probe.triplefault" \
	-M microvm,acpi=off)
expect "blk from the command line" "$o" $? 0 "PROBE virtio 0 0xfeb00e00 irq 12 id 2" \
	"PROBE blk0 capacity 2048 features 0x100000200" "PROBE blk_verify ok 3" "PROBE blk_done"
o=$(qemu -smp 1 -m 256 -kernel "$out/probe.elf" -append probe.poweroff \
	-drive id=d0,file="$img/b.img",format=raw,if=none -device virtio-blk-device,drive=d0)
expect "legacy virtio-mmio refused" "$o" $? 0 "PROBE virtio 0 0xfeb02e00 bad version 1" \
	"PROBE virtio_devices 0" "PROBE ready"

# virtio-rng, and probe.garbage against a disk and an rng (the disk's records
# still check out after it).
o=$(qemu -smp 1 -m 256 -global virtio-mmio.force-legacy=false -kernel "$out/probe.elf" \
	-append "probe.rng probe.poweroff" -device virtio-rng-device)
expect rng "$o" $? 0 "PROBE virtio 0 0xfeb02e00 irq 47 id 4" "PROBE ready"
grep -qxE "PROBE rng ok 128 [0-9]+" <<<"$o" || { echo "FAIL rng: no 'rng ok 128'"; fail=1; }
truncate -s 1M "$img/c.img"
o=$(blk "$img/c.img" ,cache=none "" "probe.garbage probe.blk_records=5 probe.rng probe.poweroff" \
	-device virtio-rng-device)
expect garbage "$o" $? 0 "PROBE garbage blk0 recovered" "PROBE garbage rng0 recovered" \
	"PROBE garbage_done" "PROBE blk_verify ok 5" "PROBE blk_done" "PROBE ready"
grep -q "rng ok 128 " <<<"$o" || { echo "FAIL garbage: no rng after it"; fail=1; }

# The ring-3 benchmarks on a disk (counts, not speed), and without RAM for them.
truncate -s 32M "$img/d.img"
bench="probe.bench_blk_read=300 probe.bench_blk_read_qd=300 probe.bench_blk_write=5"
o=$(blk "$img/d.img" ,cache=none "" "$bench probe.bench_blk_qd=16 probe.poweroff")
expect "bench blk" "$o" $? 0 "PROBE bench_blk_read start" "PROBE bench_blk_read done 300 1228800" \
	"PROBE bench_blk_read_qd start" "PROBE bench_blk_read_qd done 300 1228800" \
	"PROBE bench_blk_write start" "PROBE bench_blk_write done 5 5242880" "PROBE ready" \
	"PROBE poweroff"
o=$(blk "$img/d.img" ,cache=none "" "$bench probe.bench_blk_qd=8 probe.bench_event_idx probe.poweroff")
expect "bench blk, EVENT_IDX" "$o" $? 0 "PROBE bench_blk_read done 300 1228800" \
	"PROBE bench_blk_read_qd done 300 1228800" "PROBE bench_blk_write done 5 5242880" \
	"PROBE poweroff"
o=$(qemu -smp 1 -m 16 -kernel "$out/probe.elf" -append "probe.bench_blk_read=1 probe.poweroff")
expect "bench without its memory" "$o" $? 0 "PROBE bench error memory" "PROBE poweroff"

# virtio-net, on a tap in a private network namespace (root only): frames
# echoed by test/net-echo.py; without it, a timeout; then probe.garbage.
ns=probe-smoke-$$
if ip netns add $ns 2>/dev/null; then
	trap 'rm -rf "$img"; ip netns del $ns' EXIT
	net="-device virtio-net-device,netdev=n0 -netdev tap,id=n0,ifname=ptap0,script=no,downscript=no"
	ip netns exec $ns python3 "$(dirname "$0")/net-echo.py" ptap0 20 30 >"$img/echo" &
	o=$(ip netns exec $ns bash -c "$(declare -f qemu); qemu -smp 1 -m 256 \
		-global virtio-mmio.force-legacy=false -kernel '$out/probe.elf' \
		-append 'probe.net_echo=20 probe.poweroff' $net")
	expect "net echo" "$o" $? 0 "PROBE virtio 0 0xfeb02e00 irq 47 id 1" \
		"PROBE net0 mac 52:54:00:12:34:56" "PROBE net_echo ok 20" "PROBE ready"
	wait
	o=$(ip netns exec $ns bash -c "$(declare -f qemu); qemu -smp 1 -m 256 \
		-global virtio-mmio.force-legacy=false -kernel '$out/probe.elf' \
		-append 'probe.net_echo=1 probe.poweroff' $net")
	expect "net echo, nobody answers" "$o" $? 0 "PROBE net_echo timeout 0" "PROBE ready"
	o=$(ip netns exec $ns bash -c "$(declare -f qemu); qemu -smp 1 -m 256 \
		-global virtio-mmio.force-legacy=false -kernel '$out/probe.elf' \
		-append 'probe.garbage probe.poweroff' $net")
	expect "net garbage" "$o" $? 0 "PROBE garbage net0 recovered" "PROBE garbage_done"
	# A sender for bench_net_rx: frames of EtherType 0x88b5 on the tap (brought
	# up once QEMU made it), 1 ms apart.
	ip netns exec $ns timeout 60 python3 -c '
import socket, subprocess, time
f = b"\xff" * 6 + b"\x02\0\0\0\0\x02\x88\xb5" + bytes(1500)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
while True:
    try:
        s.bind(("ptap0", 0))
        s.send(f)
    except OSError:
        subprocess.run(["ip", "link", "set", "ptap0", "up"], stderr=subprocess.DEVNULL)
        time.sleep(0.05)
    time.sleep(0.001)' >/dev/null 2>&1 &
	sender=$!
	o=$(ip netns exec $ns bash -c "$(declare -f qemu); qemu -smp 1 -m 256 \
		-global virtio-mmio.force-legacy=false -kernel '$out/probe.elf' \
		-append 'probe.bench_net_tx=2000 probe.bench_net_rx=100 probe.poweroff' $net")
	rc=$?
	kill $sender 2>/dev/null
	wait $sender 2>/dev/null
	expect "bench net" "$o" $rc 0 "PROBE bench_net_tx done 2000 3028000" \
		"PROBE bench_net_rx done 100 151400" "PROBE ready"
else
	echo "skip net (no network namespace)"
fi
exit $fail
