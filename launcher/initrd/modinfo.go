package initrd

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Module is one kernel module file to carry.
type Module struct {
	Name    string   // as in /etc/cwrun-modules and /lib/modules/<Name>.ko: the file's base name
	Path    string   // on the host
	Depends []string // normalised names, from .modinfo
}

// normalise makes module names comparable: the kernel treats - and _
// alike.
func normalise(name string) string { return strings.ReplaceAll(name, "-", "_") }

// indexModules maps each normalised module name to its file under
// modulesDir. Debian ships uncompressed .ko files; compressed ones are
// refused by name rather than half-supported.
func indexModules(modulesDir string) (map[string]string, error) {
	idx := map[string]string{}
	err := filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		base := d.Name()
		switch {
		case strings.HasSuffix(base, ".ko"):
			idx[normalise(strings.TrimSuffix(base, ".ko"))] = p
		case strings.HasSuffix(base, ".ko.xz"), strings.HasSuffix(base, ".ko.zst"), strings.HasSuffix(base, ".ko.gz"):
			n := normalise(base[:strings.Index(base, ".ko")])
			if _, ok := idx[n]; !ok {
				idx[n] = p
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing kernel modules in %s: %w", modulesDir, err)
	}
	return idx, nil
}

// modinfo reads a module's .modinfo section: NUL-separated key=value.
func modinfo(path string) (map[string]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kernel module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("kernel module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("kernel module %s: .modinfo: %w", path, err)
	}
	info := map[string]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			if old, dup := info[k]; dup {
				v = old + "\n" + v // alias= and the like repeat
			}
			info[k] = v
		}
	}
	return info, nil
}

// Resolve returns the named modules and everything they depend on, in
// an order where each module comes after its dependencies. Names not
// found as files are assumed built into the kernel only if
// modules.builtin says so; otherwise they are an error.
func Resolve(modulesDir string, names []string) ([]Module, error) {
	idx, err := indexModules(modulesDir)
	if err != nil {
		return nil, err
	}
	builtin := readBuiltin(modulesDir)
	var order []Module
	state := map[string]int{} // 1: visiting, 2: done
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		n := normalise(name)
		switch state[n] {
		case 1:
			return fmt.Errorf("kernel modules: dependency cycle %s -> %s", strings.Join(chain, " -> "), name)
		case 2:
			return nil
		}
		path, ok := idx[n]
		if !ok {
			if builtin[n] {
				state[n] = 2
				return nil
			}
			return fmt.Errorf("kernel module %q (needed by %s) is neither a file under %s nor built in: use a kernel that has it", name, strings.Join(chain, " -> "), modulesDir)
		}
		if !strings.HasSuffix(path, ".ko") {
			return fmt.Errorf("kernel module %s is compressed: cwrun carries only uncompressed .ko files (Debian's cloud kernel ships them so)", path)
		}
		state[n] = 1
		info, err := modinfo(path)
		if err != nil {
			return err
		}
		var deps []string
		for _, d := range strings.Split(info["depends"], ",") {
			if d = strings.TrimSpace(d); d != "" {
				deps = append(deps, normalise(d))
			}
		}
		sort.Strings(deps)
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[n] = 2
		order = append(order, Module{Name: strings.TrimSuffix(filepath.Base(path), ".ko"), Path: path, Depends: deps})
		return nil
	}
	for _, name := range names {
		if err := visit(name, []string{"(wanted)"}); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readBuiltin reads modules.builtin ("kernel/crypto/aes_generic.ko"
// lines) into normalised names.
func readBuiltin(modulesDir string) map[string]bool {
	m := map[string]bool{}
	b, err := os.ReadFile(filepath.Join(modulesDir, "modules.builtin"))
	if err != nil {
		return m
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			m[normalise(strings.TrimSuffix(filepath.Base(line), ".ko"))] = true
		}
	}
	return m
}
