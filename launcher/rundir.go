package launcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cwrun/cwrun/images"
	"golang.org/x/sys/unix"
)

// A run folder holds a run's sockets, console log and QEMU's throw-away
// disk overlay. A run that ends normally removes it; one that was
// SIGKILLed cannot (QEMU dies with it: parent-death signal), so the
// next run, or Cleanup, removes the folders whose owner is dead and
// releases the image mounts they recorded.
//
// Liveness is a lock, not a pid: the run holds an exclusive flock on
// the folder's lock file for its whole life, and the kernel drops it
// when the process dies, however it dies. A pid file could name a
// reused pid.
const (
	lockFile   = "cwrun.lock"
	mountFile  = "image-mount.json"
	staleAfter = time.Minute // a folder without a lock file older than this is stale
)

// runFolder is one run's folder, locked while the run lives.
type runFolder struct {
	dir  string
	lock *os.File
}

// runBase is the folder that holds the run folders.
func runBase(base string) string {
	if base != "" {
		return base
	}
	if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" {
		return filepath.Join(x, "cwrun")
	}
	if os.Geteuid() == 0 {
		return "/run/cwrun"
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("cwrun-%d", os.Geteuid()))
}

// makeRunDir makes the run's private folder in base and locks it.
func makeRunDir(base, name string) (*runFolder, error) {
	if err := os.MkdirAll(base, 0o700); err != nil {
		return nil, fmt.Errorf("run folder: %w", err)
	}
	var d string
	if name == "" {
		var err error
		if d, err = os.MkdirTemp(base, "vm-"); err != nil {
			return nil, fmt.Errorf("run folder: %w", err)
		}
	} else {
		if strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
			return nil, fmt.Errorf("--name %q: no slashes", name)
		}
		d = filepath.Join(base, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			if errors.Is(err, os.ErrExist) {
				return nil, fmt.Errorf("--name %s: a VM of that name is running (its run folder %s exists and is locked)", name, d)
			}
			return nil, fmt.Errorf("run folder: %w", err)
		}
	}
	// Locked under another name, then renamed into place: a cleaner
	// never sees the lock file unlocked.
	tmp := filepath.Join(d, lockFile+".new")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err == nil {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			err = os.Rename(tmp, filepath.Join(d, lockFile))
		}
		if err != nil {
			f.Close()
		}
	}
	if err != nil {
		os.RemoveAll(d)
		return nil, fmt.Errorf("locking the run folder %s: %w", d, err)
	}
	return &runFolder{dir: d, lock: f}, nil
}

// remove deletes the folder, then drops the lock: a cleaner that
// waited for the lock finds the folder gone.
func (r *runFolder) remove() error {
	err := os.RemoveAll(r.dir)
	r.lock.Close()
	if err != nil {
		return fmt.Errorf("removing the run folder: %w", err)
	}
	return nil
}

// mountRecord says which image mount a run holds: a layer of a local
// store, mounted (its mount count raised) once by the run.
type mountRecord struct {
	GraphRoot string `json:"graph_root"`
	RunRoot   string `json:"run_root"`
	Driver    string `json:"driver"`
	Layer     string `json:"layer"`
}

// recordMount notes the image mount at dir, after it was made: a crash
// between the mount and the note leaks one mount count, which is safer
// than a note without a mount, whose cleanup would take a count that
// another run holds.
func (r *runFolder) recordMount(sess *images.Session, dir string) error {
	st, err := sess.Store()
	if err != nil {
		return err
	}
	layers, err := st.Layers()
	if err != nil {
		return fmt.Errorf("listing the store's layers: %w", err)
	}
	want := filepath.Clean(dir)
	for _, l := range layers {
		if l.MountPoint != "" && filepath.Clean(l.MountPoint) == want {
			b, _ := json.Marshal(mountRecord{GraphRoot: st.GraphRoot(), RunRoot: st.RunRoot(), Driver: st.GraphDriverName(), Layer: l.ID})
			return writeFileSync(filepath.Join(r.dir, mountFile), b)
		}
	}
	return fmt.Errorf("no layer of the store is mounted at %s", dir)
}

// forgetMount drops the note before the mount is released, for the
// same reason as recordMount's order.
func (r *runFolder) forgetMount() {
	os.Remove(filepath.Join(r.dir, mountFile)) //nolint:errcheck // absent is fine
}

// folderNotes are a run folder's mountNotes.
type folderNotes struct {
	rf   *runFolder
	sess *images.Session
	log  *slog.Logger
}

func (n *folderNotes) record(dir string) {
	if err := n.rf.recordMount(n.sess, dir); err != nil {
		n.log.Warn("cannot record the image mount; if cwrun is killed, it stays mounted", "error", err)
	}
}

func (n *folderNotes) forget() { n.rf.forgetMount() }

func writeFileSync(p string, b []byte) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Cleanup removes the run folders under runDir (Options.RunDir; ""
// means its default) whose cwrun is dead, and releases the image mounts
// they hold, once each: a live run of the same image keeps its own
// mount. It returns the folders removed. Run calls it before each run.
func Cleanup(ctx context.Context, sess *images.Session, runDir string, log *slog.Logger) ([]string, error) {
	base := runBase(runDir)
	ents, err := os.ReadDir(base)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the run folders in %s: %w", base, err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		if ctx.Err() != nil {
			break
		}
		if !e.IsDir() {
			continue
		}
		d := filepath.Join(base, e.Name())
		stale, lock, err := staleFolder(d)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !stale {
			continue
		}
		if err := releaseRecorded(sess, d, log); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("removing the stale run folder %s: %w", d, err))
		} else {
			removed = append(removed, d)
			log.Debug("removed the run folder of a dead cwrun", "folder", d)
		}
		if lock != nil {
			lock.Close()
		}
	}
	return removed, errors.Join(errs...)
}

// staleFolder tells whether d's owner is dead. When it is, lock (if
// any) holds the folder's lock for the caller until it has cleaned up.
func staleFolder(d string) (stale bool, lock *os.File, err error) {
	lp := filepath.Join(d, lockFile)
	f, err := os.OpenFile(lp, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		// Between a run's mkdir and its lock, or a folder of a cwrun
		// from before the lock: only an old one is stale, and only if
		// no QEMU answers on its monitor socket.
		st, err := os.Stat(d)
		if err != nil || time.Since(st.ModTime()) <= staleAfter {
			return false, nil, nil
		}
		if c, err := net.DialTimeout("unix", filepath.Join(d, "qmp.sock"), time.Second); err == nil {
			c.Close()
			return false, nil, nil
		}
		return true, nil, nil
	}
	if err != nil {
		return false, nil, fmt.Errorf("checking the run folder %s: %w", d, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil, nil // alive
		}
		return false, nil, fmt.Errorf("checking the run folder %s: %w", d, err)
	}
	// Another cleaner may have removed the folder between our open and
	// our lock: then ours is a lock on a deleted file.
	a, err1 := f.Stat()
	b, err2 := os.Stat(lp)
	if err1 != nil || err2 != nil || !os.SameFile(a, b) {
		f.Close()
		return false, nil, nil
	}
	return true, f, nil
}

// releaseRecorded releases the image mount that a dead run recorded.
func releaseRecorded(sess *images.Session, d string, log *slog.Logger) error {
	p := filepath.Join(d, mountFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", p, err)
	}
	var rec mountRecord
	if err := json.Unmarshal(b, &rec); err != nil || rec.Layer == "" {
		return fmt.Errorf("%s is damaged (%v): its image mount, if any, stays; `podman image umount` releases it", p, err)
	}
	// Forget first: a crash below leaks a count, never takes one twice.
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("removing %s: %w", p, err)
	}
	st, err := sess.Store()
	if err == nil && (st.GraphRoot() != rec.GraphRoot || st.RunRoot() != rec.RunRoot || st.GraphDriverName() != rec.Driver) {
		// The dead run used another store (--root, --runroot).
		other := images.NewSession(images.Options{Root: rec.GraphRoot, RunRoot: rec.RunRoot, Driver: rec.Driver})
		defer other.Close()
		st, err = other.Store()
	}
	if err != nil {
		return fmt.Errorf("releasing the image mount of the dead run in %s: %w", d, err)
	}
	n, err := st.Mounted(rec.Layer)
	if err != nil || n <= 0 {
		// The layer is gone (the image was removed) or not mounted.
		log.Debug("the dead run's image mount is already gone", "layer", rec.Layer, "error", err)
		return nil
	}
	if _, err := st.Unmount(rec.Layer, false); err != nil {
		return fmt.Errorf("releasing the image mount (layer %s) of the dead run in %s: %w", rec.Layer, d, err)
	}
	log.Debug("released the image mount of a dead run", "layer", rec.Layer, "mounts before", n)
	return nil
}
