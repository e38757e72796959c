package images

import (
	"errors"
	"strings"
	"testing"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		in              string
		kind            Kind
		transport, rest string
		err             string
	}{
		{in: "busybox", kind: KindBare, rest: "busybox"},
		{in: "busybox:latest", kind: KindBare, rest: "busybox:latest"},
		{in: "localhost/app:sealed", kind: KindBare, rest: "localhost/app:sealed"},
		{in: "quay.io/x/y@sha256:" + strings.Repeat("a", 64), kind: KindBare, rest: "quay.io/x/y@sha256:" + strings.Repeat("a", 64)},
		{in: "docker://quay.io/x/y:1", kind: KindTransport, transport: "docker", rest: "//quay.io/x/y:1"},
		{in: "oci:/tmp/layout:v1", kind: KindTransport, transport: "oci", rest: "/tmp/layout:v1"},
		{in: "containers-storage:localhost/a", kind: KindTransport, transport: "containers-storage", rest: "localhost/a"},
		{in: "oci-archive:../x.tar:cw", kind: KindTransport, transport: "oci-archive", rest: "../x.tar:cw"},
		{in: "ftp://host/x", err: `unknown transport "ftp"`},
		{in: "", err: "empty"},
		{in: "Not A Name", err: "neither an image name"},
	} {
		kind, transport, rest, err := Classify(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Classify(%q) = %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || kind != tc.kind || transport != tc.transport || rest != tc.rest {
			t.Errorf("Classify(%q) = %v %q %q %v; want %v %q %q", tc.in, kind, transport, rest, err, tc.kind, tc.transport, tc.rest)
		}
	}
	// The unknown-transport error lists the known ones.
	_, _, _, err := Classify("ftp://host/x")
	if err == nil || !strings.Contains(err.Error(), "docker://") || !strings.Contains(err.Error(), "oci-archive:") {
		t.Errorf("error %v does not list the known transports", err)
	}
	if errors.Is(err, ErrNotFound) {
		t.Error("an unknown transport is not ErrNotFound")
	}
}
