package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/cwrun/cwrun/launcher/vm"
)

// PodmanPublished finds the container ports that podman publishes
// (-p) into container id's network namespace (netns, its path), so
// that the VM serves them without an AnnotationPublish.
//
// podman hands the runtime no port list, but rootful podman's network
// backends forward each published port with a DNAT rule on the host,
// to the container's address: in the nat table of iptables (CNI, and
// netavark's iptables driver), or in nftables' "inet netavark" table
// (netavark's nftables driver, the default of newer podman). The
// container's addresses are those of its namespace; with iptables
// they also come from the rules tagged with its full id ("name: NET
// id: ID"), one of which (POSTROUTING) matches that address as its
// source. The ports are those of the DNAT rules that lead to one of
// those addresses. Rootless podman forwards ports with a process
// (rootlessport) instead: nothing is found, and the annotation is
// still needed.
//
// An error means no rules could be read at all (neither iptables-save
// nor nft there, not root); no rules for the container is no error.
func PodmanPublished(ctx context.Context, id, netns string) ([]vm.Forward, error) {
	if len(id) < 12 {
		// Too short an id could match another container's.
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	addrs := map[netip.Addr]bool{}
	if netns != "" {
		// Unreadable, the id-tagged rules still tell iptables' case.
		as, _ := NetNSAddrs(netns)
		for _, a := range as {
			addrs[a] = true
		}
	}
	var dnat []dnatRule
	ipt, iptErr := run(ctx, "iptables-save", "-t", "nat")
	if iptErr == nil {
		tagged, rules := parseIptablesNAT(ipt, id)
		for _, a := range tagged {
			addrs[a] = true
		}
		dnat = append(dnat, rules...)
	}
	// The table is there only where netavark's nftables driver made it.
	nft, nftErr := run(ctx, "nft", "-j", "list", "table", "inet", "netavark")
	if nftErr == nil {
		rules, err := parseNftDNAT([]byte(nft))
		if err != nil {
			return nil, fmt.Errorf("reading podman's port forwards (nft -j list table inet netavark): %w", err)
		}
		dnat = append(dnat, rules...)
	}
	if iptErr != nil && nftErr != nil {
		return nil, fmt.Errorf("reading podman's port forwards: %w; %w", iptErr, nftErr)
	}
	return forwardsTo(dnat, addrs), nil
}

// run runs a program that reads the host's state and returns its
// standard output.
func run(ctx context.Context, prog string, args ...string) (string, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// dnatRule is one port forward of the host: proto packets are sent on
// to to.
type dnatRule struct {
	proto string
	to    netip.AddrPort
}

// forwardsTo keeps the forwards to one of addrs, each port once.
func forwardsTo(dnat []dnatRule, addrs map[netip.Addr]bool) []vm.Forward {
	var fs []vm.Forward
	seen := map[vm.Forward]bool{}
	for _, r := range dnat {
		if r.proto != "tcp" && r.proto != "udp" {
			continue
		}
		if !addrs[r.to.Addr().Unmap()] || r.to.Port() == 0 {
			continue // another container's, or a port range
		}
		fw := vm.Forward{HostPort: int(r.to.Port()), GuestPort: int(r.to.Port()), Proto: r.proto}
		if !seen[fw] {
			seen[fw] = true
			fs = append(fs, fw)
		}
	}
	return fs
}

// parseIptablesNAT reads iptables-save output: the single addresses
// that rules tagged with container id match as their source, and every
// DNAT rule.
func parseIptablesNAT(rules, id string) (tagged []netip.Addr, dnat []dnatRule) {
	for line := range strings.Lines(rules) {
		if !strings.HasPrefix(line, "-A ") {
			continue
		}
		f := strings.Fields(line)
		if taggedWith(line, id) {
			if a, ok := hostAddr(flag(f, "-s")); ok {
				tagged = append(tagged, a)
			}
		}
		if flag(f, "-j") != "DNAT" {
			continue
		}
		to, err := netip.ParseAddrPort(flag(f, "--to-destination"))
		if err != nil {
			continue // a port range, or an address alone
		}
		dnat = append(dnat, dnatRule{proto: flag(f, "-p"), to: to})
	}
	return tagged, dnat
}

// parseNftDNAT reads the DNAT rules of `nft -j` output (libnftables'
// JSON): a rule that matches "tcp dport N" or "udp dport N" and ends
// in "dnat ip to ADDR:PORT", as netavark writes one per published port.
func parseNftDNAT(data []byte) ([]dnatRule, error) {
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Expr []struct {
					Match *struct {
						Left struct {
							Payload *struct {
								Protocol string `json:"protocol"`
								Field    string `json:"field"`
							} `json:"payload"`
						} `json:"left"`
					} `json:"match"`
					DNAT *struct {
						Addr json.RawMessage `json:"addr"`
						Port json.RawMessage `json:"port"`
					} `json:"dnat"`
				} `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("not nft's JSON: %w", err)
	}
	var dnat []dnatRule
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		proto := ""
		for _, e := range o.Rule.Expr {
			if m := e.Match; m != nil && m.Left.Payload != nil && m.Left.Payload.Field == "dport" {
				proto = m.Left.Payload.Protocol
			}
			if e.DNAT == nil {
				continue
			}
			// Only a plain address and port: a set, a map or a range
			// is not one of netavark's per-port rules.
			var addr string
			var port uint16
			if json.Unmarshal(e.DNAT.Addr, &addr) != nil || json.Unmarshal(e.DNAT.Port, &port) != nil {
				continue
			}
			a, err := netip.ParseAddr(addr)
			if err != nil {
				continue
			}
			dnat = append(dnat, dnatRule{proto: proto, to: netip.AddrPortFrom(a, port)})
		}
	}
	return dnat, nil
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
