package build

import (
	"fmt"
	"os"

	"github.com/cwrun/cwrun/images"
	"golang.org/x/sys/unix"
)

// ramDir is where a seal may work in memory.
const ramDir = "/dev/shm"

// workDirs are where a seal keeps the plain tree and the layer file.
type workDirs struct{ tree, layer string }

// chooseWorkDirs places the work. An explicit --tmpdir is obeyed for
// both. Otherwise the plain tree goes to RAM when it fits: creating
// files on a disk costs the kernel far more than writing their bytes
// (measured here: about 1 ms a file on the root disk), and a plain tree
// in RAM leaves nothing on disk. The layer file follows when there is
// room for it too.
func chooseWorkDirs(explicit string, img *images.Source) workDirs {
	if explicit != "" {
		return workDirs{explicit, explicit}
	}
	disk := os.Getenv("TMPDIR")
	if disk == "" {
		disk = "/var/tmp"
	}
	est := estimateTree(img)
	free := freeBytes(ramDir)
	switch {
	case est <= 0:
		return workDirs{disk, disk}
	case free >= 3*est+512<<20:
		return workDirs{ramDir, ramDir}
	case free >= est+est/4+256<<20:
		return workDirs{ramDir, disk}
	}
	return workDirs{disk, disk}
}

// estimateTree guesses the flattened tree's size from the layer sizes
// the manifest gives; compressed layers count three times. 0: unknown.
func estimateTree(img *images.Source) int64 {
	var n int64
	for _, l := range img.Layers {
		if l.Size <= 0 {
			return 0
		}
		if l.CompressionAlgorithm != nil || isCompressedMIME(l.MediaType) {
			n += 3 * l.Size
		} else {
			n += l.Size
		}
	}
	return n
}

func isCompressedMIME(m string) bool {
	for _, s := range []string{"gzip", "zstd", "xz", "bzip2"} {
		if len(m) >= len(s) && m[len(m)-len(s):] == s {
			return true
		}
	}
	return false
}

func freeBytes(dir string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Bavail) * st.Bsize
}

func mkWork(dir, what string) (string, error) {
	d, err := os.MkdirTemp(dir, "cwrun-seal-")
	if err != nil {
		return "", fmt.Errorf("making a work folder for the %s in %s: %w; set --tmpdir or TMPDIR to a writable folder with room for twice the image", what, dir, err)
	}
	return d, nil
}
