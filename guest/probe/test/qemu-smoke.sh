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
exit $fail
