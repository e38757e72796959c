package launcher

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// seedFiles are the files of a cloud-init NoCloud seed that cwrun
// carries from --cloud-init DIR; others in DIR are left out.
var seedFiles = []string{"user-data", "meta-data", "network-config", "vendor-data"}

// SeedLabel is the volume label by which cloud-init's NoCloud data
// source finds its seed.
const SeedLabel = "cidata"

// ErrNoSeedTools says the programs that write a seed are missing.
var ErrNoSeedTools = errors.New("--cloud-init needs mkfs.vfat and mcopy: install Debian's dosfstools and mtools (apt-get install dosfstools mtools)")

// seedTools finds mkfs.vfat and mcopy.
func seedTools() (mkfs, mcopy string, err error) {
	if mkfs, err = exec.LookPath("mkfs.vfat"); err != nil {
		return "", "", ErrNoSeedTools
	}
	if mcopy, err = exec.LookPath("mcopy"); err != nil {
		return "", "", ErrNoSeedTools
	}
	return mkfs, mcopy, nil
}

// BuildSeed writes a cloud-init NoCloud seed to out: a FAT volume
// labelled cidata (as cloud-localds makes it) holding DIR's user-data,
// meta-data, network-config and vendor-data. user-data must exist; a
// missing meta-data gets "instance-id: <instanceID>", since cloud-init
// needs one and runs its once-per-instance steps again when it changes.
func BuildSeed(ctx context.Context, dir, out, instanceID string) error {
	mkfs, mcopy, err := seedTools()
	if err != nil {
		return err
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("--cloud-init %s: not a folder (want one holding user-data and, optionally, meta-data and network-config)", dir)
	}
	if _, err := os.Stat(filepath.Join(dir, "user-data")); err != nil {
		return fmt.Errorf("--cloud-init %s: no user-data file in it (cloud-init's NoCloud seed needs one; it may be empty)", dir)
	}
	work, err := os.MkdirTemp(filepath.Dir(out), ".seed-")
	if err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	defer os.RemoveAll(work)
	var files []string
	var total int64
	for _, name := range seedFiles {
		p := filepath.Join(dir, name)
		st, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			if name != "meta-data" {
				continue
			}
			p = filepath.Join(work, name)
			if err := os.WriteFile(p, []byte("instance-id: "+instanceID+"\n"), 0o600); err != nil {
				return fmt.Errorf("cloud-init seed: %w", err)
			}
			st, err = os.Stat(p)
		}
		if err != nil {
			return fmt.Errorf("--cloud-init: %w", err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("--cloud-init: %s is not a regular file", p)
		}
		files = append(files, p)
		total += st.Size()
	}
	// FAT12 with room for the files, their clusters' slack and the
	// tables; 1 MiB at least.
	kib := max(1024, (total*2)/1024+256)
	tmp := filepath.Join(work, "seed.img")
	if err := runTool(ctx, mkfs, "-n", SeedLabel, "-C", tmp, fmt.Sprint(kib)); err != nil {
		return fmt.Errorf("writing the cloud-init seed: %w", err)
	}
	for _, p := range files {
		if err := runTool(ctx, mcopy, "-i", tmp, "-o", p, "::"+filepath.Base(p)); err != nil {
			return fmt.Errorf("writing %s into the cloud-init seed: %w", p, err)
		}
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("cloud-init seed: %w", err)
	}
	return nil
}

func runTool(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	// mtools refuses images whose geometry it finds odd unless told.
	cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
