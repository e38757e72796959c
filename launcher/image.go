package launcher

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"

	"github.com/cwrun/cwrun/build"
	"github.com/cwrun/cwrun/build/luks"
	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
)

// sealedDisk is a sealed image's disk.img on the host, ready for the
// VMM, with its workload config.
type sealedDisk struct {
	Path    string
	Config  sealed.Config
	Image   string       // the image's name, for messages
	release func() error // unmounts the image, if it was mounted
}

// mountNotes records a run's image mount in its run folder, so that a
// later run can release it if this one is killed (see rundir.go).
type mountNotes interface {
	record(dir string)
	forget()
}

// findDisk locates disk.img and krun-sev.json of a sealed image without
// copying when it can: a local-storage image is mounted read-only and
// its disk.img used in place (QEMU writes to a throw-away overlay); an
// image of any other transport has them extracted once into the cache,
// keyed by the layer's digest. notes, when not nil, records the image
// mount as soon as it exists, and forgets it before it is released.
func findDisk(ctx context.Context, sess *images.Session, ref, cacheDir string, log *slog.Logger, notes mountNotes) (*sealedDisk, error) {
	img, err := sess.Open(ctx, ref)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	name := images.Ref(img.Ref)
	notSealed := func() error {
		return fmt.Errorf("%s: %w: it has no /%s and /%s in its root file system, so it is an ordinary image; seal it first with `cwrun build %s SEALED` and run SEALED",
			name, build.ErrNotSealed, sealed.ConfigPath, sealed.DiskPath, ref)
	}

	dir, unmount, err := sess.Mount(img)
	if err == nil {
		if notes != nil {
			notes.record(dir)
		}
		d, err := diskIn(dir, name)
		if err != nil {
			if notes != nil {
				notes.forget()
			}
			unmount() //nolint:errcheck // the error below matters more
			if errors.Is(err, os.ErrNotExist) {
				return nil, notSealed()
			}
			return nil, err
		}
		d.release = unmount
		log.Debug("booting the disk in the mounted image", "path", d.Path)
		return d, nil
	}
	if !errors.Is(err, images.ErrNotMountable) {
		log.Info("cannot mount the image; extracting its disk instead", "error", err)
	}

	// Cached from an earlier run?
	for i := len(img.Layers) - 1; i >= 0; i-- {
		if d, err := diskIn(layerCache(cacheDir, img.Layers[i].Digest.Encoded()), name); err == nil {
			log.Debug("booting the disk extracted by an earlier run", "path", d.Path)
			return d, nil
		}
	}
	for i := len(img.Layers) - 1; i >= 0; i-- {
		d, err := extractDisk(ctx, img, i, layerCache(cacheDir, img.Layers[i].Digest.Encoded()), name)
		if err == nil {
			log.Debug("booting the disk extracted from the image", "path", d.Path)
			return d, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	return nil, notSealed()
}

// CheckSealedDir tells whether dir (an OCI bundle's root file system)
// holds a valid sealed layout; the error wraps build.ErrNotSealed when
// the layout is missing.
func CheckSealedDir(dir, name string) error {
	_, err := sealedDirDisk(dir, name)
	return err
}

func sealedDirDisk(dir, name string) (*sealedDisk, error) {
	if name == "" {
		name = dir
	}
	d, err := diskIn(dir, name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w: its root file system has no /%s and /%s, so it is an ordinary image; seal it first with `cwrun build IMAGE SEALED` and run SEALED",
			name, build.ErrNotSealed, sealed.ConfigPath, sealed.DiskPath)
	}
	return d, err
}

func layerCache(cacheDir, digest string) string { return filepath.Join(cacheDir, "disks", digest) }

// diskIn reads the sealed layout from a folder (a mounted image or a
// cache entry). A missing file is an os.ErrNotExist error.
func diskIn(dir, name string) (*sealedDisk, error) {
	cfgJSON, err := os.ReadFile(filepath.Join(dir, sealed.ConfigPath))
	if err != nil {
		return nil, err
	}
	disk := filepath.Join(dir, sealed.DiskPath)
	if _, err := os.Stat(disk); err != nil {
		return nil, err
	}
	cfg, err := sealed.ParseConfig(cfgJSON)
	if err != nil {
		return nil, fmt.Errorf("%s: /%s: %w", name, sealed.ConfigPath, err)
	}
	if err := checkDisk(disk); err != nil {
		return nil, fmt.Errorf("%s: /%s: %w; the image is damaged: pull or seal it again", name, sealed.DiskPath, err)
	}
	return &sealedDisk{Path: disk, Config: cfg, Image: name}, nil
}

// checkDisk parses the LUKS header, so that a damaged disk fails here
// with a clear message and not after a VM boot.
func checkDisk(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := luks.Parse(f); err != nil {
		return fmt.Errorf("no valid LUKS header: %w", err)
	}
	return nil
}

// extractDisk writes layer i's disk.img and krun-sev.json into dest
// (atomically: a temporary folder renamed into place). os.ErrNotExist
// when the layer lacks them.
func extractDisk(ctx context.Context, img *images.Source, i int, dest, name string) (*sealedDisk, error) {
	if err := os.MkdirAll(filepath.Dir(dest), 0o700); err != nil {
		return nil, fmt.Errorf("disk cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dest), ".extract-")
	if err != nil {
		return nil, fmt.Errorf("disk cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	r, err := img.Layer(ctx, i)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	found := 0
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading layer %d of %s: %w", i, name, err)
		}
		p := path.Clean("/" + h.Name)
		if h.Typeflag != tar.TypeReg || (p != "/"+sealed.DiskPath && p != "/"+sealed.ConfigPath) {
			continue
		}
		if p == "/"+sealed.ConfigPath && h.Size > sealed.MaxConfigSize {
			return nil, fmt.Errorf("%s: /%s is %d bytes, more than a workload config", name, sealed.ConfigPath, h.Size)
		}
		f, err := os.OpenFile(filepath.Join(tmp, p[1:]), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("disk cache: %w", err)
		}
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("extracting /%s of %s: %w", p[1:], name, err)
		}
		found++
	}
	if found < 2 {
		return nil, os.ErrNotExist
	}
	if _, err := diskIn(tmp, name); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, dest); err != nil {
		if d, err2 := diskIn(dest, name); err2 == nil { // another run won the race
			return d, nil
		}
		return nil, fmt.Errorf("disk cache: %w", err)
	}
	return diskIn(dest, name)
}
