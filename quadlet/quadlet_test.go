package quadlet

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/coreos/go-systemd/v22/unit"
	"github.com/cwrun/cwrun/launcher/oci"
)

func base() Spec {
	return Spec{Image: "registry.example/app:sealed", Name: "app", Runtime: "/usr/bin/cwrun",
		KBS: "https://kbs.example:8443", KBSCACert: "/etc/cwrun/kbs-ca.pem",
		Publish: []string{"8080:80", "127.0.0.1:9090:90/udp"}, Env: []string{"MODE=prod", "GREETING=hello world"}}
}

// values parses the unit with go-systemd's parser and returns each
// section/key's values in order.
func values(t *testing.T, b []byte) map[string][]string {
	t.Helper()
	opts, err := unit.DeserializeOptions(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("the generated unit does not parse: %v\n%s", err, b)
	}
	m := map[string][]string{}
	for _, o := range opts {
		m[o.Section+"."+o.Name] = append(m[o.Section+"."+o.Name], o.Value)
	}
	return m
}

func TestContainerUnit(t *testing.T) {
	var buf bytes.Buffer
	if err := Generate(&buf, base(), FormatContainer); err != nil {
		t.Fatal(err)
	}
	v := values(t, buf.Bytes())
	want := map[string][]string{
		"Container.Image":         {"registry.example/app:sealed"},
		"Container.ContainerName": {"app"},
		"Container.GlobalArgs":    {"--runtime /usr/bin/cwrun"},
		"Container.Notify":        {"true"},
		"Container.Annotation":    {"io.cwrun.kbs=https://kbs.example:8443", "io.cwrun.kbs-cacert=/etc/cwrun/kbs-ca.pem", "io.cwrun.publish=80,90/udp"},
		"Container.PublishPort":   {"8080:80", "127.0.0.1:9090:90/udp"},
		"Container.Environment":   {"MODE=prod", `"GREETING=hello world"`},
		"Service.Restart":         {"on-failure"},
		"Install.WantedBy":        {"multi-user.target default.target"},
		"Unit.After":              {"network-online.target"},
	}
	for k, w := range want {
		if !reflect.DeepEqual(v[k], w) {
			t.Errorf("%s = %q, want %q", k, v[k], w)
		}
	}
	if _, ok := v["Container.Runtime"]; ok {
		t.Error("Runtime= is not a quadlet key")
	}
	if FileName("app", FormatContainer) != "app.container" {
		t.Error(FileName("app", FormatContainer))
	}
}

func TestServiceUnit(t *testing.T) {
	s := base()
	s.Env = append(s.Env, "PCT=100%", "Q=a\"b")
	var buf bytes.Buffer
	if err := Generate(&buf, s, FormatService); err != nil {
		t.Fatal(err)
	}
	v := values(t, buf.Bytes())
	start := v["Service.ExecStart"]
	if len(start) != 1 {
		t.Fatalf("ExecStart %q", start)
	}
	for _, want := range []string{"/usr/bin/podman --runtime /usr/bin/cwrun run ", "--cidfile=%t/%n.ctr-id", "--sdnotify=container", "--name app",
		"--annotation io.cwrun.kbs=https://kbs.example:8443", "--annotation io.cwrun.publish=80,90/udp", "-p 8080:80", `-e "GREETING=hello world"`, "-e PCT=100%%", `-e "Q=a\"b"`,
		" registry.example/app:sealed"} {
		if !strings.Contains(start[0], want) {
			t.Errorf("ExecStart %q lacks %q", start[0], want)
		}
	}
	for k, w := range map[string]string{"Service.Type": "notify", "Service.Restart": "on-failure", "Install.WantedBy": "multi-user.target default.target"} {
		if len(v[k]) != 1 || v[k][0] != w {
			t.Errorf("%s = %q, want %q", k, v[k], w)
		}
	}
	if !strings.Contains(v["Service.ExecStopPost"][0], "rm -f --ignore") {
		t.Errorf("ExecStopPost %q", v["Service.ExecStopPost"])
	}
	verify(t, buf.Bytes(), "app.service")
}

// verify runs systemd-analyze verify on the service where it works.
func verify(t *testing.T, b []byte, name string) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil || testing.Short() {
		t.Log("systemd-analyze verify skipped (not installed, or -short)")
		return
	}
	if _, err := os.Stat("/usr/bin/podman"); err != nil {
		t.Log("systemd-analyze verify skipped: it checks ExecStart's program, and /usr/bin/podman is absent")
		return
	}
	p := filepath.Join(t.TempDir(), name)
	os.WriteFile(p, b, 0o644)
	// /usr/bin/cwrun need not exist: only ExecStart's program is checked.
	out, err := exec.Command(sa, "verify", p).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze verify %s: %v\n%s\n%s", name, err, out, b)
	}
	t.Logf("systemd-analyze verify: ok %s", out)
}

func TestGenerateRefuses(t *testing.T) {
	for _, c := range []struct {
		name   string
		mod    func(*Spec)
		format string
		want   string
	}{
		{"no image", func(s *Spec) { s.Image = "" }, FormatContainer, "no image"},
		{"bad name", func(s *Spec) { s.Name = "a/b" }, FormatContainer, "--name"},
		{"relative runtime", func(s *Spec) { s.Runtime = "cwrun" }, FormatContainer, "absolute path"},
		{"bad publish", func(s *Spec) { s.Publish = []string{"80:99999"} }, FormatContainer, "-p"},
		{"bad proto", func(s *Spec) { s.Publish = []string{"80:80/sctp"} }, FormatService, "protocol"},
		{"bad env", func(s *Spec) { s.Env = []string{"NOEQUALS"} }, FormatService, "-e"},
		{"newline env", func(s *Spec) { s.Env = []string{"A=b\nExecStartPre=/bin/evil"} }, FormatService, "-e"},
		{"bad restart", func(s *Spec) { s.Restart = "sometimes" }, FormatContainer, "--restart"},
		{"relative ca", func(s *Spec) { s.KBSCACert = "ca.pem" }, FormatContainer, "absolute"},
		{"bad format", func(s *Spec) {}, "kube", "--format"},
		{"image injection", func(s *Spec) { s.Image = "x --privileged" }, FormatService, "image"},
	} {
		s := base()
		c.mod(&s)
		var buf bytes.Buffer
		err := Generate(&buf, s, c.format)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
}

func FuzzCheckPublish(f *testing.F) {
	for _, s := range []string{"80", "8080:80", "127.0.0.1:8080:80/tcp", "[::1]:1:2", "::80", "a:b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if checkPublish(s) != nil {
			return
		}
		// Whatever passes must not break the unit's lines.
		if strings.ContainsAny(s, "\n\" ") {
			t.Fatalf("%q accepted", s)
		}
	})
}

// The runtime reads the annotation the units write.
func TestPublishAnnotationMatchesTheRuntime(t *testing.T) {
	if AnnotationPublish != oci.AnnotationPublish {
		t.Errorf("quadlet writes %s, the runtime reads %s", AnnotationPublish, oci.AnnotationPublish)
	}
	for p, want := range map[string]string{"80": "80", "8080:80": "80", "127.0.0.1:9090:90/udp": "90/udp", "[::1]:1:2/tcp": "2/tcp", "127.0.0.1::53": "53"} {
		if got := containerPort(p); got != want {
			t.Errorf("%s: %s, want %s", p, got, want)
		}
		if _, err := oci.ParsePublish(containerPort(p)); err != nil {
			t.Errorf("%s: the runtime refuses what the unit says: %v", p, err)
		}
	}
}
