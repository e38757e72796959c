// Package quadlet writes systemd units that run a sealed image with
// podman and cwrun as its OCI runtime: a quadlet .container file
// (podman 4.4 and later turn it into a service), or, for hosts whose
// podman predates quadlet (Debian 12 ships 4.3), an equivalent plain
// .service that calls podman itself.
package quadlet

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/unit"
)

// Formats.
const (
	FormatContainer = "container"
	FormatService   = "service"
)

// Annotations the cwrun runtime reads (see cmd/cwrun/oci.go and
// launcher/oci.AnnotationPublish).
const (
	AnnotationKBS       = "io.cwrun.kbs"
	AnnotationKBSCACert = "io.cwrun.kbs-cacert"
	// AnnotationPublish names the guest ports QEMU serves in the
	// container's network namespace: podman tells the runtime nothing
	// about -p, so the unit says it next to each PublishPort=.
	AnnotationPublish = "io.cwrun.publish"
)

// Spec is one sealed workload's unit.
type Spec struct {
	// Image is the sealed image's reference; Name names the container
	// and the unit (Name.container, Name.service).
	Image, Name string
	// Runtime is cwrun's absolute path, given to podman as --runtime
	// (quadlet has no Runtime= key, hence GlobalArgs=).
	Runtime string
	// Podman is podman's path for the service form; default
	// /usr/bin/podman.
	Podman string
	// KBS and KBSCACert become annotations the runtime reads: the key
	// broker's URL (default: the sealed one) and its CA file. Neither
	// is a secret.
	KBS, KBSCACert string
	// Publish are podman -p values; Env are KEY=VALUE pairs (honoured
	// only if the image was sealed with --allow-overrides).
	Publish, Env []string
	// Restart is systemd's Restart=; default on-failure.
	Restart string
	// StopTimeout is podman stop's -t in seconds; default 10.
	StopTimeout int
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

var restarts = map[string]bool{"no": true, "always": true, "on-success": true, "on-failure": true, "on-abnormal": true, "on-abort": true, "on-watchdog": true}

func (s *Spec) check() error {
	if s.Image == "" {
		return errors.New("no image: name the sealed image to run")
	}
	if strings.ContainsAny(s.Image, " \t\n\"'\\%$") {
		return fmt.Errorf("image %q: a reference has no spaces, quotes, %% or $", s.Image)
	}
	if !nameRE.MatchString(s.Name) || len(s.Name) > 200 {
		return fmt.Errorf("--name %q: want letters, digits, '_', '.' or '-' (it names the unit and the container)", s.Name)
	}
	if !filepath.IsAbs(s.Runtime) || strings.ContainsAny(s.Runtime, " \t\n\"'\\%$") {
		return fmt.Errorf("runtime %q: want cwrun's absolute path, without spaces, quotes, %% or $", s.Runtime)
	}
	if s.Podman == "" {
		s.Podman = "/usr/bin/podman"
	}
	if s.Restart == "" {
		s.Restart = "on-failure"
	}
	if !restarts[s.Restart] {
		return fmt.Errorf("--restart %q: want one of systemd's Restart= values (no, always, on-failure, ...)", s.Restart)
	}
	if s.StopTimeout == 0 {
		s.StopTimeout = 10
	}
	if s.StopTimeout < 0 {
		return fmt.Errorf("--stop-timeout %d: want seconds, 0 or more", s.StopTimeout)
	}
	for _, p := range s.Publish {
		if err := checkPublish(p); err != nil {
			return err
		}
	}
	for _, e := range s.Env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t\n\"'\\$%=") || strings.ContainsAny(e, "\n\x00") {
			return fmt.Errorf("-e %q: want KEY=VALUE, the key without spaces or quotes, no newlines", e)
		}
	}
	for _, v := range []struct{ flag, val string }{{"--kbs", s.KBS}, {"--kbs-cacert", s.KBSCACert}} {
		if strings.ContainsAny(v.val, " \t\n\"'\\%$") {
			return fmt.Errorf("%s %q: no spaces, quotes, %% or $", v.flag, v.val)
		}
	}
	if s.KBSCACert != "" && !filepath.IsAbs(s.KBSCACert) {
		return fmt.Errorf("--kbs-cacert %q: the service runs elsewhere: give an absolute path", s.KBSCACert)
	}
	return nil
}

// checkPublish reads podman's [[IP:]HOSTPORT:]CONTAINERPORT[/PROTO].
func checkPublish(p string) error {
	bad := func(why string) error {
		return fmt.Errorf("-p %q: %s; want [[IP:]HOSTPORT:]CONTAINERPORT[/tcp|/udp]", p, why)
	}
	spec, proto, _ := strings.Cut(p, "/")
	if proto != "" && proto != "tcp" && proto != "udp" {
		return bad("unknown protocol " + proto)
	}
	parts := strings.Split(spec, ":")
	if len(parts) == 3 {
		if net.ParseIP(strings.Trim(parts[0], "[]")) == nil {
			return bad("host address " + parts[0] + " is not an IP address")
		}
		parts = parts[1:]
	}
	if len(parts) > 2 {
		return bad("too many fields")
	}
	for i, x := range parts {
		if i == 0 && len(parts) == 2 && x == "" {
			continue // IP::CONTAINERPORT: any host port
		}
		n, err := strconv.Atoi(x)
		if err != nil || n < 1 || n > 65535 {
			return bad("ports are numbers from 1 to 65535")
		}
	}
	return nil
}

// Generate writes the unit in format to w; the file's name is
// FileName(s.Name, format).
func Generate(w io.Writer, s Spec, format string) error {
	if err := s.check(); err != nil {
		return err
	}
	var opts []*unit.UnitOption
	switch format {
	case FormatContainer:
		opts = containerUnit(s)
	case FormatService:
		opts = serviceUnit(s)
	default:
		return fmt.Errorf("--format %q: want container (quadlet, podman 4.4+) or service (plain systemd, any podman)", format)
	}
	b, err := io.ReadAll(unit.Serialize(opts))
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# Generated by `cwrun quadlet generate`: the sealed image %s, run by podman with cwrun as its OCI runtime.\n", s.Image)
	buf.Write(b)
	_, err = w.Write(buf.Bytes())
	return err
}

// FileName is the unit's file name.
func FileName(name, format string) string {
	if format == FormatService {
		return name + ".service"
	}
	return name + ".container"
}

func opt(section, name, value string) *unit.UnitOption {
	return &unit.UnitOption{Section: section, Name: name, Value: value}
}

func unitSection(s Spec) []*unit.UnitOption {
	return []*unit.UnitOption{
		opt("Unit", "Description", fmt.Sprintf("cwrun sealed workload %s (%s)", s.Name, s.Image)),
		// The key broker is reached over the network at each start.
		opt("Unit", "Wants", "network-online.target"),
		opt("Unit", "After", "network-online.target"),
	}
}

func installSection() []*unit.UnitOption {
	return []*unit.UnitOption{opt("Install", "WantedBy", "multi-user.target default.target")}
}

func (s Spec) annotations() []string {
	var a []string
	if s.KBS != "" {
		a = append(a, AnnotationKBS+"="+s.KBS)
	}
	if s.KBSCACert != "" {
		a = append(a, AnnotationKBSCACert+"="+s.KBSCACert)
	}
	if len(s.Publish) > 0 {
		var ports []string
		for _, p := range s.Publish {
			ports = append(ports, containerPort(p))
		}
		a = append(a, AnnotationPublish+"="+strings.Join(ports, ","))
	}
	return a
}

// containerPort is the CONTAINERPORT[/PROTO] of a checked -p value:
// where the guest listens, and where podman forwards the host port to.
func containerPort(p string) string {
	spec, proto, _ := strings.Cut(p, "/")
	port := spec[strings.LastIndexByte(spec, ':')+1:]
	if proto != "" {
		return port + "/" + proto
	}
	return port
}

func containerUnit(s Spec) []*unit.UnitOption {
	o := unitSection(s)
	o = append(o,
		opt("Container", "Image", s.Image),
		opt("Container", "ContainerName", s.Name),
		opt("Container", "GlobalArgs", "--runtime "+s.Runtime),
		// podman --sdnotify=container: cwrun sends READY=1 when the
		// workload runs in the guest (its disk unlocked after
		// attestation), so the unit is started when the workload is,
		// not when its VM begins to boot.
		opt("Container", "Notify", "true"),
	)
	for _, a := range s.annotations() {
		o = append(o, opt("Container", "Annotation", a))
	}
	for _, p := range s.Publish {
		o = append(o, opt("Container", "PublishPort", p))
	}
	for _, e := range s.Env {
		o = append(o, opt("Container", "Environment", systemdQuote(strings.ReplaceAll(e, "%", "%%"))))
	}
	o = append(o,
		opt("Service", "Restart", s.Restart),
		// The VM's boot and a graceful stop take seconds, more under TCG.
		opt("Service", "TimeoutStartSec", "300"),
		opt("Service", "TimeoutStopSec", strconv.Itoa(s.StopTimeout+30)),
	)
	return append(o, installSection()...)
}

// serviceUnit is what `podman generate systemd --new` writes, with
// cwrun as the runtime.
func serviceUnit(s Spec) []*unit.UnitOption {
	o := unitSection(s)
	o = append(o, opt("Unit", "RequiresMountsFor", "%t/containers"))
	run := []string{s.Podman, "--runtime", s.Runtime, "run", "--cidfile=%t/%n.ctr-id", "--cgroups=no-conmon", "--rm",
		"--sdnotify=container", "-d", "--replace", "--name", s.Name}
	for _, a := range s.annotations() {
		run = append(run, "--annotation", a)
	}
	for _, p := range s.Publish {
		run = append(run, "-p", p)
	}
	for _, e := range s.Env {
		run = append(run, "-e", escapeSpecifiers(e))
	}
	run = append(run, s.Image)
	args := make([]string, len(run))
	for i, a := range run {
		args[i] = systemdQuote(a)
	}
	t := strconv.Itoa(s.StopTimeout)
	o = append(o,
		opt("Service", "Environment", "PODMAN_SYSTEMD_UNIT=%n"),
		opt("Service", "Restart", s.Restart),
		opt("Service", "TimeoutStartSec", "300"),
		opt("Service", "TimeoutStopSec", strconv.Itoa(s.StopTimeout+30)),
		opt("Service", "ExecStart", strings.Join(args, " ")),
		opt("Service", "ExecStop", s.Podman+" stop --ignore -t "+t+" --cidfile=%t/%n.ctr-id"),
		opt("Service", "ExecStopPost", s.Podman+" rm -f --ignore -t "+t+" --cidfile=%t/%n.ctr-id"),
		opt("Service", "Type", "notify"),
		opt("Service", "NotifyAccess", "all"),
	)
	return append(o, installSection()...)
}

// escapeSpecifiers keeps systemd from expanding % specifiers and $
// variables in a value of the user's.
func escapeSpecifiers(s string) string {
	return strings.NewReplacer("%", "%%", "$", "$$").Replace(s)
}

// systemdQuote quotes a word for systemd's command lines and
// Environment=: double quotes when it has spaces or quotes, with \ and
// " escaped.
func systemdQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\"'\\;") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}
