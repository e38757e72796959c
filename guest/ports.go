package guest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// findPorts waits until every named virtio-serial port exists and
// returns their device paths by name. The ports appear when
// virtio_console probes, possibly a little after its module loaded.
func findPorts(names []string, timeout time.Duration) (map[string]string, error) {
	deadline := time.Now().Add(timeout)
	for {
		found := scanPorts("/sys/class/virtio-ports")
		missing := []string{}
		for _, n := range names {
			if _, ok := found[n]; !ok {
				missing = append(missing, n)
				continue
			}
			if _, err := os.Stat(found[n]); err != nil {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 {
			return found, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("virtio-serial ports %s did not appear within %s (found %v): start the VM with a virtio-serial device and these ports",
				strings.Join(missing, ", "), timeout, found)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scanPorts maps each port's name to /dev/<vportNpM>.
func scanPorts(class string) map[string]string {
	m := map[string]string{}
	entries, _ := os.ReadDir(class)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(class, e.Name(), "name"))
		if err != nil {
			continue
		}
		if name := strings.TrimSpace(string(b)); name != "" {
			m[name] = "/dev/" + e.Name()
		}
	}
	return m
}
