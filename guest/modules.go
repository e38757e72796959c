package guest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The initrd's module list (written by launcher/initrd): one module
// name a line, dependencies first; each is /lib/modules/<name>.ko.
const (
	modulesList = "/etc/cwrun-modules"
	modulesDir  = "/lib/modules"
)

func loadModules(list string) ([]string, error) {
	f, err := os.Open(list)
	if err != nil {
		return nil, fmt.Errorf("reading the module list: %w (the initrd was not made by cwrun?)", err)
	}
	defer f.Close()
	var loaded []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		if err := loadModule(filepath.Join(modulesDir, name+".ko")); err != nil {
			return loaded, err
		}
		loaded = append(loaded, name)
	}
	return loaded, sc.Err()
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening module: %w", err)
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err != nil && !errors.Is(err, unix.EEXIST) { // EEXIST: built in or loaded already
		return fmt.Errorf("loading module %s: %w", path, err)
	}
	return nil
}
