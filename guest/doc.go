// Package guest is cwrun-init, the PID 1 of a cwrun microVM: it loads
// the kernel modules the initrd carries, opens the virtio-serial ports,
// takes its config from the host, unlocks the sealed disk with
// device-mapper ioctls, mounts it as the root, runs the workload and
// reports its exit, then powers the VM off.
//
// It is pure Go and static (CGO_ENABLED=0): no shell, no cryptsetup, no
// libc. Any failed step stops, reports why on the control port and the
// console, and powers off: a confidential init never logs and
// continues on a security step. It must never import c/image,
// c/storage, cwrun's build packages (build/luks excepted) or the key
// broker (depcheck_test.go enforces it).
package guest
