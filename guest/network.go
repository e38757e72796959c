package guest

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// QEMU user networking (slirp) defaults.
var (
	slirpAddr    = net.IPv4(10, 0, 2, 15)
	slirpMask    = net.IPv4(255, 255, 255, 0)
	slirpGateway = net.IPv4(10, 0, 2, 2)
	slirpDNS     = "10.0.2.3"
)

// setupNetwork brings lo up and, when wanted, configures the first
// ethernet interface for slirp with a default route.
func setupNetwork(want bool, log *console) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("network: socket: %w", err)
	}
	defer unix.Close(fd)
	if err := ifUp(fd, "lo", nil, nil); err != nil {
		return err
	}
	if !want {
		return nil
	}
	name, err := firstEthernet(5 * time.Second)
	if err != nil {
		return err
	}
	if err := ifUp(fd, name, slirpAddr, slirpMask); err != nil {
		return err
	}
	if err := addDefaultRoute(fd, slirpGateway); err != nil {
		return err
	}
	// resolv.conf is a convenience: a read-only root or a symlink out of
	// the root keeps the image's own, and the workload still runs.
	if err := os.WriteFile("/etc/resolv.conf", []byte("nameserver "+slirpDNS+"\n"), 0o644); err != nil {
		log.Printf("network: not writing /etc/resolv.conf: %v", err)
	}
	return nil
}

// firstEthernet prefers eth0, else the first interface that is not lo.
func firstEthernet(timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		ifs, _ := net.Interfaces()
		var names []string
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback == 0 {
				names = append(names, i.Name)
			}
		}
		for _, n := range names {
			if n == "eth0" {
				return n, nil
			}
		}
		if len(names) > 0 {
			return names[0], nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("network: no interface besides lo after %s: start the VM with a virtio-net device (or --network none)", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ifUp(fd int, name string, addr, mask net.IP) error {
	if addr != nil {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		if err := ifr.SetInet4Addr(addr.To4()); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFADDR, ifr); err != nil {
			return fmt.Errorf("network: setting %s's address %s: %w", name, addr, err)
		}
		if err := ifr.SetInet4Addr(mask.To4()); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFNETMASK, ifr); err != nil {
			return fmt.Errorf("network: setting %s's netmask: %w", name, err)
		}
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: reading %s's flags: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: bringing %s up: %w", name, err)
	}
	return nil
}

// rtentry is struct rtentry of <net/route.h> on 64-bit Linux; Go lays
// the fields out as C does.
type rtentry struct {
	pad1    uint64
	dst     unix.RawSockaddrInet4
	gateway unix.RawSockaddrInet4
	genmask unix.RawSockaddrInet4
	flags   uint16
	pad2    int16
	pad3    uint64
	pad4    uintptr
	metric  int16
	dev     uintptr
	mtu     uint64
	window  uint64
	irtt    uint16
}

func addDefaultRoute(fd int, gw net.IP) error {
	rt := rtentry{flags: unix.RTF_UP | unix.RTF_GATEWAY}
	rt.dst.Family = unix.AF_INET
	rt.genmask.Family = unix.AF_INET
	rt.gateway.Family = unix.AF_INET
	copy(rt.gateway.Addr[:], gw.To4())
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCADDRT, uintptr(unsafe.Pointer(&rt)))
	if errno != 0 && errno != unix.EEXIST {
		return fmt.Errorf("network: adding the default route via %s: %w", gw, errno)
	}
	return nil
}

// mountShares mounts the host's folders.
func mountShares(shares []shareMount) error {
	for _, s := range shares {
		if err := doMount(s.mount()); err != nil {
			return fmt.Errorf("share %q: %w (does the guest kernel have 9p/virtiofs?)", s.Tag, err)
		}
	}
	return nil
}

type shareMount struct {
	Tag, Path, FSType string
	ReadOnly          bool
}

func (s shareMount) mount() mount {
	var flags uintptr = unix.MS_NOSUID | unix.MS_NODEV
	if s.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if strings.EqualFold(s.FSType, "virtiofs") {
		return mount{s.Tag, s.Path, "virtiofs", flags, ""}
	}
	return mount{s.Tag, s.Path, "9p", flags, "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"}
}
