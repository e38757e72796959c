package oci

import (
	"bufio"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/launcher/vm"
)

func TestParseIptablesNAT(t *testing.T) {
	cni, err := os.ReadFile("testdata/iptables-cni.txt")
	if err != nil {
		t.Fatal(err)
	}
	nv, err := os.ReadFile("testdata/iptables-netavark.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, rules, id string
		want            []vm.Forward
	}{
		{"cni", string(cni), "6c1708b52f50b1922313d3dc86198fc297854b769c365427b99fac0356ea383a",
			[]vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}, {HostPort: 81, GuestPort: 81, Proto: "udp"}}},
		{"cni other container", string(cni), "d0e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f",
			[]vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}}},
		{"netavark", string(nv), "7c0f1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80",
			[]vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}}},
		// An id that is a prefix of another's matches nothing.
		{"prefix of an id", string(cni), "6c1708b52f50b1922313d3dc86198fc2", nil},
		{"unknown container", string(cni), "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", nil},
		{"no rules", "", "6c1708b52f50b1922313d3dc86198fc297854b769c365427b99fac0356ea383a", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tagged, dnat := parseIptablesNAT(tc.rules, tc.id)
			addrs := map[netip.Addr]bool{}
			for _, a := range tagged {
				addrs[a] = true
			}
			if got := forwardsTo(dnat, addrs); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestMergePublish(t *testing.T) {
	ann := []vm.Forward{{HostPort: 80, GuestPort: 8080, Proto: "tcp"}}
	found := []vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}, {HostPort: 80, GuestPort: 80, Proto: "udp"}, {HostPort: 443, GuestPort: 443, Proto: "tcp"}}
	want := []vm.Forward{{HostPort: 80, GuestPort: 8080, Proto: "tcp"}, {HostPort: 80, GuestPort: 80, Proto: "udp"}, {HostPort: 443, GuestPort: 443, Proto: "tcp"}}
	if got := MergePublish(ann, found); !reflect.DeepEqual(got, want) {
		t.Errorf("the annotation's mapping must win for its port: got %+v, want %+v", got, want)
	}
}

// nft-netavark.json is what nft 1.0.6 lists for nft-netavark.nft, a
// table in the shape netavark's nftables driver writes.
func TestParseNftDNAT(t *testing.T) {
	data, err := os.ReadFile("testdata/nft-netavark.json")
	if err != nil {
		t.Fatal(err)
	}
	dnat, err := parseNftDNAT(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		addrs []string
		want  []vm.Forward
	}{
		{"container with two ports", []string{"10.88.0.7", "fe80::1"},
			[]vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}, {HostPort: 53, GuestPort: 53, Proto: "udp"}}},
		{"container bound to a host address", []string{"10.88.0.9"},
			[]vm.Forward{{HostPort: 443, GuestPort: 443, Proto: "tcp"}}},
		// aardvark-dns's forward matches "th dport", not one protocol.
		{"the DNS server's address", []string{"10.88.0.1"}, nil},
		{"no address", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addrs := map[netip.Addr]bool{}
			for _, a := range tc.addrs {
				addrs[netip.MustParseAddr(a)] = true
			}
			if got := forwardsTo(dnat, addrs); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	for _, bad := range []string{"", "[", `{"nftables": 1}`} {
		if _, err := parseNftDNAT([]byte(bad)); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// PodmanPublished against real nftables: a network namespace stands for
// the host, with netavark's table loaded by nft, and another for the
// container, with its address on a veth. The lookup runs in
// the first (nft, forked from its thread, lists that namespace's rules)
// and reads the second's addresses itself.
func TestPodmanPublishedNftables(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, nft)")
	}
	for _, p := range []string{"unshare", "nft", "ip"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (util-linux, nftables, iproute2: hack/deps.sh)", p)
		}
	}
	ruleset, err := filepath.Abs("testdata/nft-netavark.nft")
	if err != nil {
		t.Fatal(err)
	}
	host := holdNetNS(t, "nft -f '"+ruleset+"'")
	ctr := holdNetNS(t, "ip link add eth0 type veth peer name peer0 && ip addr add 10.88.0.7/16 dev eth0")
	other := holdNetNS(t, "true")

	addrs, err := NetNSAddrs(ctr)
	if want := []netip.Addr{netip.MustParseAddr("10.88.0.7")}; err != nil || !reflect.DeepEqual(addrs[:min(1, len(addrs))], want) {
		t.Fatalf("NetNSAddrs: %v, %v; want %v first", addrs, err, want)
	}
	id := "7c0f1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80"
	for _, tc := range []struct {
		name  string
		netns string
		want  []vm.Forward
	}{
		{"the container's", ctr, []vm.Forward{{HostPort: 80, GuestPort: 80, Proto: "tcp"}, {HostPort: 53, GuestPort: 53, Proto: "udp"}}},
		{"a namespace no rule leads to", other, nil},
	} {
		var got []vm.Forward
		err := inNetNS(host, func() (err error) {
			got, err = PodmanPublished(context.Background(), id, tc.netns)
			return err
		})
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	if _, err := NetNSAddrs(filepath.Join(t.TempDir(), "gone")); err == nil || !strings.Contains(err.Error(), "gone") {
		t.Errorf("a namespace that is not there: %v", err)
	}
}

// holdNetNS starts a process in a new network namespace, runs setup
// there (sh), and returns the namespace's path; the process, and with
// it the namespace, ends with the test.
func holdNetNS(t *testing.T, setup string) string {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "--", "sh", "-c", setup+" && echo ready && exec sleep 120")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("namespace setup %q: %s", setup, errb.String())
	}
	return "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/net"
}
