package guest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/sealed"
)

// imageConfig is the part of /.krun_config.json (an OCI image config,
// sealed inside the encrypted disk) that says what to run.
type imageConfig struct {
	Config struct {
		User       string
		Env        []string
		Entrypoint []string
		Cmd        []string
		WorkingDir string
		Labels     map[string]string
	} `json:"config"`
}

// allowsOverrides reports whether the seal lets the host override what
// runs. It is read from the config inside the encrypted disk, never
// from the footer: the host can rewrite the footer, not the disk.
func (c imageConfig) allowsOverrides() bool {
	return c.Config.Labels[sealed.LabelAllowOverrides] == "true"
}

func readImageConfig(p string) (imageConfig, error) {
	var c imageConfig
	b, err := os.ReadFile(p)
	if err != nil {
		return c, fmt.Errorf("reading the sealed image config: %w (was the disk sealed by cwrun or buildah mkcw?)", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("parsing the sealed image config %s: %w", p, err)
	}
	return c, nil
}

// workload is what to run, resolved.
type workload struct {
	Args []string
	Env  []string
	Dir  string
	User string
}

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ErrOverridesRefused is returned when the host asks to change what a
// sealed image runs and the image does not allow it.
var ErrOverridesRefused = errors.New("the host asked to override the sealed command, environment, working directory or user, but the sealed config does not allow overrides (seal with overrides allowed, or run without COMMAND and -e)")

// resolveWorkload merges the sealed image config with the host's
// overrides; allowOverrides is img.allowsOverrides(), kept a parameter
// for the tests.
func resolveWorkload(img imageConfig, host *proto.Config, allowOverrides bool) (workload, error) {
	c := img.Config
	w := workload{Env: c.Env, Dir: c.WorkingDir, User: c.User}
	cmd := c.Cmd
	overrides := len(host.Args) > 0 || len(host.Env) > 0 || host.Workdir != "" || host.User != ""
	if overrides && !allowOverrides {
		return w, ErrOverridesRefused
	}
	if len(host.Args) > 0 {
		cmd = host.Args // as `docker run IMAGE ARGS`: the entrypoint stays
	}
	w.Args = append(append([]string{}, c.Entrypoint...), cmd...)
	w.Env = mergeEnv(c.Env, host.Env)
	if host.Workdir != "" {
		w.Dir = host.Workdir
	}
	if host.User != "" {
		w.User = host.User
	}
	if w.Dir == "" {
		w.Dir = "/"
	}
	if len(w.Args) == 0 {
		return w, errors.New("the sealed image config has neither Entrypoint nor Cmd: nothing to run")
	}
	return w, nil
}

// mergeEnv appends extra to base, later keys replacing earlier ones in
// place, and adds a default PATH when none is set.
func mergeEnv(base, extra []string) []string {
	var out []string
	idx := map[string]int{}
	for _, kv := range append(append([]string{}, base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	if _, ok := idx["PATH"]; !ok {
		out = append(out, defaultPath)
	}
	return out
}

// withTerm adds TERM=xterm for a pty when the sealed environment sets
// no TERM, as docker and podman do: programs need it to drive the
// terminal, and it changes nothing the seal protects.
func withTerm(env []string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "TERM=") {
			return env
		}
	}
	return append(append([]string{}, env...), "TERM=xterm")
}

// lookPath finds argv0 in the workload's PATH (not the init's).
func lookPath(argv0 string, env []string) (string, error) {
	if strings.Contains(argv0, "/") {
		return argv0, nil
	}
	pathEnv := strings.TrimPrefix(defaultPath, "PATH=")
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, dir := range strings.Split(pathEnv, ":") {
		if dir == "" {
			dir = "."
		}
		p := path.Join(dir, argv0)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q: executable not found in PATH %s of the sealed root", argv0, pathEnv)
}
