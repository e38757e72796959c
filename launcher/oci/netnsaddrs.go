package oci

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetNSAddrs lists the addresses of the interfaces in the network
// namespace at path (a bind mount or /proc/PID/ns/net), loopback's
// left out.
func NetNSAddrs(path string) ([]netip.Addr, error) {
	var ifaddrs []net.Addr
	err := inNetNS(path, func() (err error) {
		ifaddrs, err = net.InterfaceAddrs()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("addresses in network namespace %s: %w", path, err)
	}
	var as []netip.Addr
	for _, ia := range ifaddrs {
		p, err := netip.ParsePrefix(ia.String())
		if err != nil || p.Addr().IsLoopback() {
			continue
		}
		as = append(as, p.Addr())
	}
	return as, nil
}

// inNetNS runs f in the network namespace at path, on a thread of its
// own: setns moves one thread only, and so do the processes f starts
// (forked from that thread). If the thread cannot be moved back it is
// not unlocked, and the runtime ends it with its goroutine instead of
// handing it, in the wrong namespace, to other code.
func inNetNS(path string, f func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return err
	}
	defer target.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("this thread's network namespace: %w", err)
			return
		}
		defer self.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("entering the namespace: %w", err)
			return
		}
		ferr := f()
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		done <- ferr
	}()
	return <-done
}
