package oci

import (
	"os"
	"reflect"
	"testing"

	"github.com/cwrun/cwrun/launcher/vm"
)

func TestParsePodmanDNAT(t *testing.T) {
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
			if got := parsePodmanDNAT(tc.rules, tc.id); !reflect.DeepEqual(got, tc.want) {
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
