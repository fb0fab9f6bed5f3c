#!/bin/busybox sh
# ferrovm exec's guest init (PID 1), run by busybox from the initramfs ferrovm builds.
#
# It loads the modules the host packed (/etc/modules, in load order), finds the
# virtio-console ports by name (stdin, stdout, stderr, status), mounts the host's
# root over virtio-fs read-only on /newroot with tmpfs and shares over it as
# /exec/run.conf says, runs CMD there in a chroot with its stdio on the ports, and
# reports on the status port:
#   started         CMD is about to run
#   exit N          CMD ended with status N (128+S when killed by signal S)
#   error MESSAGE   the guest could not run CMD (the host exits 255)
# then powers off. Before the status port exists, errors go to the console UART
# as "ferrovm-exec: error: ..." lines, which the host reads.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

p_status=
say() { echo "ferrovm-exec: $*" >/dev/console; }
fail() {
	[ -n "$p_status" ] && echo "error $*" >"$p_status"
	say "error: $*"
	poweroff -f
	while :; do sleep 1000; done
}

if [ -f /etc/modules ]; then
	while read -r m; do
		insmod "$m" || say "insmod $m failed"
	done </etc/modules
fi

find_ports() {
	for f in /sys/class/virtio-ports/*/name; do
		[ -r "$f" ] || continue
		n=$(cat "$f")
		d=${f%/name}
		d=/dev/${d##*/}
		case $n in
		stdin) p_in=$d ;;
		stdout) p_out=$d ;;
		stderr) p_err=$d ;;
		status) p_status=$d ;;
		esac
	done
}
i=0
while :; do
	find_ports
	[ -n "$p_in" ] && [ -n "$p_out" ] && [ -n "$p_err" ] && [ -n "$p_status" ] && break
	i=$((i + 1))
	[ "$i" -gt 200 ] && fail "no virtio-console ports after 20 s: the kernel needs CONFIG_VIRTIO_CONSOLE (and CONFIG_VIRTIO_PCI)"
	sleep 0.1
done
grep -qw virtiofs /proc/filesystems ||
	fail "the kernel has no virtio-fs: it needs CONFIG_VIRTIO_FS and CONFIG_FUSE_FS"

# share TAG ro|rw PATH: a virtio-fs share mounted at PATH of the new root.
share() {
	mkdir -p "/newroot$3" 2>/dev/null
	mount -t virtiofs -o "$2" "$1" "/newroot$3" || fail "cannot mount the virtio-fs share $1 on $3"
}
# scratch PATH MODE: a tmpfs over PATH, if the host has it.
scratch() {
	[ -d "/newroot$1" ] || return 0
	mount -t tmpfs -o "mode=$2" tmpfs "/newroot$1" || fail "cannot mount a tmpfs on $1"
}
mount -t virtiofs -o ro root /newroot || fail "cannot mount the host's root (virtio-fs tag root)"
# run.conf defines mounts (the tmpfs and shares over the root, in order), cwd and
# run_cmd (CMD with its environment, quoted by the host).
. /exec/run.conf
mounts
mount -t proc proc /newroot/proc || fail "cannot mount /proc"
mount -t sysfs sys /newroot/sys || fail "cannot mount /sys"
mount -t devtmpfs dev /newroot/dev || fail "cannot mount /dev"
mkdir -p /newroot/run/ferrovm 2>/dev/null && cp /bin/busybox /newroot/run/ferrovm/busybox ||
	fail "cannot put busybox in /run/ferrovm"

echo started >"$p_status"
run_cmd <"$p_in" >"$p_out" 2>"$p_err"
rc=$?
sync
echo "exit $rc" >"$p_status"
poweroff -f
while :; do sleep 1000; done
