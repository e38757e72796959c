package oci

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/cwrun/cwrun/launcher/vm"
)

// PodmanPublished finds the container ports that podman publishes
// (-p) into container id's network namespace, so that the VM serves
// them without an AnnotationPublish.
//
// podman hands the runtime no port list, but rootful podman's network
// backends (CNI, and netavark with iptables) forward each published
// port with a DNAT rule in the host's nat table, to the container's
// address; and they tag the container's own rules with a comment that
// holds its full id ("name: NET id: ID"), one of which (POSTROUTING)
// matches that address as its source. So the container's addresses
// come from the rules tagged with its id, and its ports from the DNAT
// rules that lead to those addresses. Rootless podman forwards ports
// with a process (rootlessport) instead: nothing is found, and the
// annotation is still needed.
//
// An error means the rules could not be read (no iptables-save, not
// root); no rules for the container is no error.
func PodmanPublished(ctx context.Context, id string) ([]vm.Forward, error) {
	if len(id) < 12 {
		// Too short an id could match another container's.
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, "iptables-save", "-t", "nat")
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("reading podman's port forwards (iptables-save -t nat): %w: %s", err, strings.TrimSpace(errb.String()))
	}
	return parsePodmanDNAT(out.String(), id), nil
}

// parsePodmanDNAT reads iptables-save output: see PodmanPublished.
func parsePodmanDNAT(rules, id string) []vm.Forward {
	addrs := map[netip.Addr]bool{}
	var dnat [][]string
	for line := range strings.Lines(rules) {
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		f := strings.Fields(line)
		if taggedWith(line, id) {
			if a, ok := hostAddr(flag(f, "-s")); ok {
				addrs[a] = true
			}
		}
		if flag(f, "-j") == "DNAT" {
			dnat = append(dnat, f)
		}
	}
	var fs []vm.Forward
	seen := map[vm.Forward]bool{}
	for _, f := range dnat {
		proto := flag(f, "-p")
		if proto != "tcp" && proto != "udp" {
			continue
		}
		to, err := netip.ParseAddrPort(flag(f, "--to-destination"))
		if err != nil || !addrs[to.Addr()] || to.Port() == 0 {
			continue // another container's, or a port range
		}
		fw := vm.Forward{HostPort: int(to.Port()), GuestPort: int(to.Port()), Proto: proto}
		if !seen[fw] {
			seen[fw] = true
			fs = append(fs, fw)
		}
	}
	return fs
}

// taggedWith says whether a rule's comment names container id in
// full: `id: "ID"` (CNI, quotes escaped by iptables-save) or `id: ID`
// (netavark).
func taggedWith(line, id string) bool {
	for _, pre := range []string{`id: \"`, `id: `} {
		i := strings.Index(line, pre+id)
		if i < 0 {
			continue
		}
		rest := line[i+len(pre)+len(id):]
		if rest == "" || !isHex(rest[0]) {
			return true
		}
	}
	return false
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// flag is the value after name in a rule's fields ("" if absent).
func flag(f []string, name string) string {
	for i := 0; i+1 < len(f); i++ {
		if f[i] == name {
			return f[i+1]
		}
	}
	return ""
}

// hostAddr reads a rule's source when it is one address (A.B.C.D/32).
func hostAddr(s string) (netip.Addr, bool) {
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.IsSingleIP() {
		return netip.Addr{}, false
	}
	return p.Addr(), true
}

// MergePublish adds the detected forwards to the annotation's, unless
// the annotation already names that container port and protocol.
func MergePublish(annotated, detected []vm.Forward) []vm.Forward {
	out := append([]vm.Forward(nil), annotated...)
	for _, d := range detected {
		named := false
		for _, a := range annotated {
			if a.HostPort == d.HostPort && a.Proto == d.Proto {
				named = true
				break
			}
		}
		if !named {
			out = append(out, d)
		}
	}
	return out
}
