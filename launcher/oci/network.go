package oci

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/cwrun/cwrun/launcher/vm"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// AnnotationPublish names the guest ports that the VM serves inside
// the container's network namespace: a comma-separated list of
// [CONTAINERPORT:]GUESTPORT[/tcp|/udp], such as "80" or "8080:80,53/udp".
//
// podman publishes a port (-p HOST:CONTAINER) by forwarding the host
// port into the container's network namespace, and hands the runtime
// nothing that says which ports those are: podman 4.3 writes no port
// mapping into config.json or its annotations (the mappings live in
// podman's own database and in the network backend's rules). A sealed
// image's config has no EXPOSE either: cwrun build and buildah mkcw
// clear it, and the real one is inside the encrypted disk. Rootful
// podman's rules are read (PodmanPublished); where they cannot be
// (rootless podman), or to serve a container port from another guest
// port, the ports are named here, next to -p:
//
//	podman run -p 8080:80 --annotation io.cwrun.publish=80 --runtime cwrun IMAGE
//
// and `cwrun quadlet generate -p` writes the annotation itself.
const AnnotationPublish = "io.cwrun.publish"

// ParsePublish reads AnnotationPublish. The container port is where
// QEMU listens in the container's network namespace, on every address
// there (podman's forwarding arrives at the container's address); the
// guest port is where the workload listens in the VM.
func ParsePublish(s string) ([]vm.Forward, error) {
	var fs []vm.Forward
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		bad := func(why string) error {
			return fmt.Errorf("annotation %s: %q: %s (want [CONTAINERPORT:]GUESTPORT[/tcp|/udp], such as 80 or 8080:80/tcp)", AnnotationPublish, item, why)
		}
		ports, proto, _ := strings.Cut(item, "/")
		proto = strings.ToLower(proto)
		switch proto {
		case "":
			proto = "tcp"
		case "tcp", "udp":
		default:
			return nil, bad("the protocol must be tcp or udp")
		}
		outer, inner, two := strings.Cut(ports, ":")
		if !two {
			inner = outer
		}
		op, err1 := port(outer)
		ip, err2 := port(inner)
		if err := errors.Join(err1, err2); err != nil {
			return nil, bad(err.Error())
		}
		fs = append(fs, vm.Forward{HostPort: op, GuestPort: ip, Proto: proto})
	}
	return fs, nil
}

func port(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	return n, nil
}

// NetNS is the network namespace the bundle asks the container to run
// in; the zero value means the runtime's own (podman --network host).
type NetNS struct {
	// Path is a namespace to join (podman made it and forwards the
	// published ports into it).
	Path string
	// New asks for a fresh, empty namespace (a network namespace
	// without a path).
	New bool
}

// BundleNetNS reads the network namespace from the bundle's config.
func BundleNetNS(s *specs.Spec) NetNS {
	if s == nil || s.Linux == nil {
		return NetNS{}
	}
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			if ns.Path == "" {
				return NetNS{New: true}
			}
			return NetNS{Path: ns.Path}
		}
	}
	return NetNS{}
}

// QEMUInNetNS returns a program that starts qemu in the namespace:
// the launcher's QEMU binary for this container. Close the closer
// when the VM is gone.
//
// Only QEMU joins the container's network namespace, so that the
// guest's user-mode network (its traffic out, and the ports it
// publishes) is the container's; the supervisor stays in the host's,
// where the key broker it relays to is reachable as the sealed image
// names it. Go cannot move a running process into a namespace (setns
// changes one thread, and QEMU is forked from a thread the launcher
// picks), so the move happens in the exec chain instead: nsenter
// (util-linux) joins the namespace and execs QEMU, keeping the pid,
// the process group and the parent-death signal the launcher set.
//
// The program is a two-line script held in a memfd and run through
// /proc/PID/fd/N: no file to clean up, and nothing to refuse it on a
// host whose /run is mounted noexec (Debian's initramfs does so).
func QEMUInNetNS(qemu string, ns NetNS) (string, io.Closer, error) {
	var enter string
	switch {
	case ns.Path != "":
		enter = "nsenter --net=" + shellQuote(ns.Path) + " --"
	case ns.New:
		enter = "unshare --net --"
	default:
		return "", nil, errors.New("no network namespace to enter")
	}
	prog, _, _ := strings.Cut(enter, " ")
	if _, err := exec.LookPath(prog); err != nil {
		return "", nil, fmt.Errorf("%s not found: it puts QEMU in the container's network namespace; install Debian's util-linux", prog)
	}
	script := "#!/bin/sh\n# cwrun: QEMU in the container's network namespace.\nexec " + enter + " " + shellQuote(qemu) + " \"$@\"\n"
	fd, err := unix.MemfdCreate("cwrun-qemu-netns", unix.MFD_CLOEXEC)
	if err != nil {
		return "", nil, fmt.Errorf("QEMU launcher for the network namespace: memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "cwrun-qemu-netns")
	if _, err := f.WriteString(script); err != nil {
		f.Close()
		return "", nil, fmt.Errorf("QEMU launcher for the network namespace: %w", err)
	}
	// Through this process's pid, not /proc/self: the path must name
	// this descriptor from the forked child and from the shell that
	// reads the script, which do not hold it (close-on-exec).
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd), f, nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
