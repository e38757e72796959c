package oci

import (
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// notifyEnv is the variable through which podman --sdnotify=container
// hands the container the socket for sd_notify(3) messages.
const notifyEnv = "NOTIFY_SOCKET"

// NotifySocket is the host path of the sd_notify socket the bundle
// gives the container, "" when it gives none.
//
// podman --sdnotify=container puts NOTIFY_SOCKET=/run/notify/notify.sock
// in the process's environment and bind mounts the folder of conmon's
// proxy socket on /run/notify: a runc-style runtime leaves both to the
// container's process. The workload here runs in a VM that cannot
// reach a host socket, so the supervisor speaks for it and sends
// READY=1 when the guest reports that the workload started.
func NotifySocket(s *specs.Spec) string {
	if s == nil || s.Process == nil {
		return ""
	}
	var inside string
	for _, kv := range s.Process.Env {
		if k, v, _ := strings.Cut(kv, "="); k == notifyEnv {
			inside = v
		}
	}
	if inside == "" || !filepath.IsAbs(inside) {
		// An abstract socket ("@...") lives in the container's network
		// namespace, which the supervisor is not in.
		return ""
	}
	inside = filepath.Clean(inside)
	// The innermost bind mount that holds the path says where it is on
	// the host.
	best := -1
	var host string
	for _, m := range s.Mounts {
		d := filepath.Clean(m.Destination)
		if m.Source == "" || !filepath.IsAbs(m.Source) || !isBind(m) {
			continue
		}
		rel, err := filepath.Rel(d, inside)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			continue
		}
		if len(d) > best {
			best, host = len(d), filepath.Join(m.Source, rel)
		}
	}
	return host
}

func isBind(m specs.Mount) bool {
	if m.Type == "bind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}
