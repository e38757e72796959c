package build

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
	"golang.org/x/sys/unix"
)

// prepareTree makes the plain root file system that mkfs.ext4 reads,
// and returns it with a function that drops it (safe to call twice).
//
// An image in local storage is mounted, already flattened by the
// kernel's overlayfs, with /.krun_config.json laid over it: nothing is
// extracted, which on a disk that creates files slowly is most of a
// seal's time. Any other image, or one with --add-file, has its layers
// extracted into work.
func prepareTree(ctx context.Context, sess *images.Session, img *images.Source, work string, krunConfig []byte, opts Options) (string, func() error, error) {
	if len(opts.AddFiles) == 0 {
		root, drop, err := mountTree(sess, img, work, krunConfig)
		if err == nil {
			opts.Log.Debug("sealing from the mounted image", "path", root)
			return root, drop, nil
		}
		if errors.Is(err, images.ErrNotMountable) {
			opts.Log.Debug("extracting the image's layers", "reason", err)
		} else {
			opts.Log.Info("cannot mount the image, extracting its layers instead", "error", err)
		}
	}
	root := filepath.Join(work, "rootfs")
	if err := os.Mkdir(root, 0o755); err != nil {
		return "", nil, err
	}
	drop := onceErr(func() error {
		if err := os.RemoveAll(root); err != nil {
			return fmt.Errorf("removing the plain root file system in %s: %w", root, err)
		}
		return nil
	})
	if err := flatten(ctx, img, root, opts.Progress); err != nil {
		drop()
		return "", nil, err
	}
	if err := addFiles(ctx, root, krunConfig, opts.AddFiles); err != nil {
		drop()
		return "", nil, err
	}
	return root, drop, nil
}

// mountTree lays a folder holding only /.krun_config.json over the
// mounted image, as a read-only overlay of two lower layers.
func mountTree(sess *images.Session, img *images.Source, work string, krunConfig []byte) (string, func() error, error) {
	image, unmountImage, err := sess.Mount(img)
	if err != nil {
		return "", nil, err
	}
	extras := filepath.Join(work, "extras")
	merged := filepath.Join(work, "merged")
	fail := func(err error) (string, func() error, error) {
		unmountImage()
		return "", nil, err
	}
	if err := os.Mkdir(extras, 0o755); err != nil {
		return fail(err)
	}
	if err := os.Mkdir(merged, 0o755); err != nil {
		return fail(err)
	}
	// The overlay's root takes its owner and mode from the top layer.
	var st syscall.Stat_t
	if err := syscall.Stat(image, &st); err != nil {
		return fail(err)
	}
	if err := os.Chown(extras, int(st.Uid), int(st.Gid)); err != nil {
		return fail(err)
	}
	if err := os.Chmod(extras, os.FileMode(st.Mode&0o777)|modeBits(st.Mode)); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(extras, sealed.KrunConfigInDisk), krunConfig, 0o644); err != nil {
		return fail(err)
	}
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, "lowerdir="+extras+":"+image); err != nil {
		return fail(fmt.Errorf("overlay of %s: %w", image, err))
	}
	return merged, onceErr(func() error {
		err := unix.Unmount(merged, 0)
		return errors.Join(err, unmountImage())
	}), nil
}

func modeBits(m uint32) os.FileMode {
	var fm os.FileMode
	if m&syscall.S_ISUID != 0 {
		fm |= os.ModeSetuid
	}
	if m&syscall.S_ISGID != 0 {
		fm |= os.ModeSetgid
	}
	if m&syscall.S_ISVTX != 0 {
		fm |= os.ModeSticky
	}
	return fm
}

// onceErr runs f once; later calls return its first result.
func onceErr(f func() error) func() error {
	var once sync.Once
	var err error
	return func() error {
		once.Do(func() { err = f() })
		return err
	}
}
