package build

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

const (
	blockSize   = 4096
	minDiskSize = 10 << 20 // what buildah mkcw uses as the floor
	inodeSize   = 256
)

// treeStats is what sizing the ext4 file system needs to know of a tree.
type treeStats struct {
	Bytes   int64 // data, each file rounded up to whole blocks
	Entries int64 // inodes needed
}

// measureTree sums a flattened tree's data blocks and inodes. Hard links
// count once.
func measureTree(root string) (treeStats, error) {
	var st treeStats
	seen := map[uint64]bool{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if sys, ok := info.Sys().(*syscall.Stat_t); ok && !info.IsDir() && sys.Nlink > 1 {
			if seen[sys.Ino] {
				return nil
			}
			seen[sys.Ino] = true
		}
		st.Entries++
		switch {
		case info.Mode().IsRegular():
			st.Bytes += roundUp(info.Size(), blockSize)
		case info.IsDir():
			st.Bytes += blockSize
		case info.Mode()&fs.ModeSymlink != 0 && info.Size() >= 60:
			st.Bytes += blockSize // longer targets do not fit in the inode
		}
		return nil
	})
	if err != nil {
		return treeStats{}, fmt.Errorf("measuring the flattened root file system: %w", err)
	}
	return st, nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// inodeCount gives mkfs enough inodes for the tree and room to grow.
func inodeCount(st treeStats) int64 { return st.Entries + st.Entries/4 + 2048 }

// ext4Overhead estimates the metadata of an ext4 file system of size
// bytes made by mke2fs with the defaults we use: journal, inode tables,
// bitmaps, group descriptors and their reserve.
func ext4Overhead(size int64, inodes int64) int64 {
	blocks := size / blockSize
	var journal int64 // mke2fs's ext2fs_default_journal_size, in blocks
	switch {
	case blocks < 2048:
		journal = 0
	case blocks < 32768:
		journal = 1024
	case blocks < 256*1024:
		journal = 4096
	case blocks < 512*1024:
		journal = 8192
	case blocks < 4096*1024:
		journal = 16384
	case blocks < 8192*1024:
		journal = 32768
	case blocks < 16384*1024:
		journal = 65536
	default:
		journal = 262144
	}
	groups := blocks/32768 + 1
	// Per group: two bitmaps; plus descriptors and reserved GDT blocks
	// (up to 1024x growth), about 1%.
	meta := journal*blockSize + inodes*inodeSize + groups*2*blockSize + size/100 + 1<<20
	return roundUp(meta, blockSize)
}

// Slop is the extra space a sealed disk gets over its contents: a
// fraction of the tree's size, or a fixed number of bytes.
type Slop struct {
	Fraction float64 // 0.25 is 25%
	Bytes    int64
}

// DefaultSlop is buildah mkcw's: 25%.
var DefaultSlop = Slop{Fraction: 0.25}

// ParseSlop reads "25%", "0.25" or a size such as "64MiB" or "1G".
func ParseSlop(s string) (Slop, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || f < 0 {
			return Slop{}, fmt.Errorf("slop %q: want a percentage like 25%%, a fraction like 0.25 or a size like 64MiB", s)
		}
		return Slop{Fraction: f / 100}, nil
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil && f >= 0 {
		return Slop{Fraction: f}, nil
	}
	n, err := parseSize(s)
	if err != nil {
		return Slop{}, fmt.Errorf("slop %q: want a percentage like 25%%, a fraction like 0.25 or a size like 64MiB", s)
	}
	return Slop{Bytes: n}, nil
}

func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1}}
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(n, 64)
			if err != nil || v < 0 {
				return 0, fmt.Errorf("bad size %q", s)
			}
			return int64(v * float64(u.mult)), nil
		}
	}
	return 0, fmt.Errorf("bad size %q", s)
}

func (s Slop) String() string {
	if s.Bytes > 0 {
		return fmt.Sprintf("%d bytes", s.Bytes)
	}
	return fmt.Sprintf("%g%%", s.Fraction*100)
}

// ErrSlop says the requested slop leaves no room for the tree.
var ErrSlop = errors.New("too little slop")

// diskSize picks the ext4 size for a tree: the tree plus slop, rounded
// to whole blocks, at least 10 MiB. It fails, saying what slop would do,
// when that cannot hold the tree and ext4's own metadata.
func diskSize(st treeStats, slop Slop) (int64, error) {
	size := st.Bytes + int64(float64(st.Bytes)*slop.Fraction) + slop.Bytes
	size = max(roundUp(size, blockSize), minDiskSize)
	need := minimumSize(st)
	if size < need {
		pct := float64(need-st.Bytes) / float64(st.Bytes) * 100
		return 0, fmt.Errorf("%w: slop %s gives a %d MiB disk, but the %d MiB tree needs at least %d MiB with ext4's metadata; use --slop %.0f%% or more",
			ErrSlop, slop, size>>20, st.Bytes>>20, (need+(1<<20)-1)>>20, pct+1)
	}
	return size, nil
}

// minimumSize is the smallest disk that holds the tree and its metadata.
func minimumSize(st treeStats) int64 {
	need := roundUp(st.Bytes, blockSize)
	for range 8 { // the overhead grows with the size; a few rounds settle it
		next := roundUp(st.Bytes+ext4Overhead(need, inodeCount(st)), blockSize)
		if next <= need {
			break
		}
		need = next
	}
	return max(need, minDiskSize)
}

// mkfsProgram finds mkfs.ext4: in PATH, or in the sbin folders that a
// non-root PATH often lacks.
func mkfsProgram(override string) (string, error) {
	if override != "" {
		if _, err := os.Stat(override); err != nil {
			return "", fmt.Errorf("mkfs.ext4 at %s: %w; install Debian's e2fsprogs (apt-get install e2fsprogs)", override, err)
		}
		return override, nil
	}
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("mkfs.ext4 not found: install Debian's e2fsprogs (apt-get install e2fsprogs)")
}

// mkfs makes an ext4 file system of size bytes holding the tree at root,
// inside file at byte offset off (mke2fs's offset option), so the file
// system lands where the encrypted payload will be.
func mkfs(ctx context.Context, prog, root, file string, off, size int64, st treeStats) error {
	args := []string{
		"-F", "-q", "-t", "ext4", "-b", strconv.Itoa(blockSize),
		"-m", "0", // no blocks reserved for root: the slop is for the workload
		"-N", strconv.FormatInt(inodeCount(st), 10),
		"-I", strconv.Itoa(inodeSize),
		"-E", fmt.Sprintf("offset=%d,nodiscard", off),
		"-d", root,
		file, strconv.FormatInt(size/1024, 10) + "k",
	}
	cmd := exec.CommandContext(ctx, prog, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		msg := strings.TrimSpace(out.String())
		if strings.Contains(msg, "No space left on device") {
			return fmt.Errorf("mkfs.ext4 writing %s: no space left on device; free space there or set --tmpdir", file)
		}
		if strings.Contains(msg, "Could not allocate block") || strings.Contains(msg, "Could not allocate inode") {
			return fmt.Errorf("%w: mkfs.ext4 ran out of room in a %d MiB disk (%s); raise --slop", ErrSlop, size>>20, lastLine(msg))
		}
		return fmt.Errorf("mkfs.ext4 -d %s: %v: %s", root, err, msg)
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
