package build

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseSlop(t *testing.T) {
	for in, want := range map[string]Slop{
		"25%": {Fraction: 0.25}, "0.5": {Fraction: 0.5}, "0": {}, "64MiB": {Bytes: 64 << 20}, "1G": {Bytes: 1 << 30},
	} {
		got, err := ParseSlop(in)
		if err != nil || got != want {
			t.Errorf("ParseSlop(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-5%", "lots", "12XB", "-1"} {
		if _, err := ParseSlop(bad); err == nil {
			t.Errorf("ParseSlop(%q) accepted", bad)
		}
	}
}

func TestDiskSize(t *testing.T) {
	small := treeStats{Bytes: 1 << 20, Entries: 100}
	got, err := diskSize(small, DefaultSlop)
	if err != nil || got != minDiskSize {
		t.Fatalf("small tree: %d, %v; want the 10 MiB floor", got, err)
	}
	big := treeStats{Bytes: 200 << 20, Entries: 9000}
	got, err = diskSize(big, DefaultSlop)
	if err != nil || got%blockSize != 0 || got < big.Bytes+ext4Overhead(got, inodeCount(big)) {
		t.Fatalf("200 MiB tree, 25%%: %d, %v", got, err)
	}
	_, err = diskSize(big, Slop{Fraction: 0.01})
	if !errors.Is(err, ErrSlop) || !strings.Contains(err.Error(), "--slop") {
		t.Fatalf("1%% slop on a 200 MiB tree: %v; want ErrSlop naming the slop to use", err)
	}
	// The slop it recommends works.
	var pct float64
	msg := err.Error()
	i := strings.Index(msg, "--slop ")
	if _, serr := fmt.Sscan(msg[i+len("--slop "):], &pct); serr != nil {
		t.Fatalf("no percentage in %q", msg)
	}
	if _, err := diskSize(big, Slop{Fraction: pct / 100}); err != nil {
		t.Fatalf("the recommended slop %.0f%% fails: %v", pct, err)
	}
}

func TestMeasureTree(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), make([]byte, 5000), 0o644)
	os.Link(filepath.Join(dir, "a"), filepath.Join(dir, "hard"))
	os.Mkdir(filepath.Join(dir, "d"), 0o755)
	os.Symlink("a", filepath.Join(dir, "d", "l"))
	st, err := measureTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	// root dir + d: 2 blocks; a: 2 blocks (hard link counted once); short symlink: none.
	if st.Bytes != 4*blockSize || st.Entries != 4 {
		t.Fatalf("got %+v, want 4 blocks and 4 inodes", st)
	}
}

func TestMkfsMissing(t *testing.T) {
	_, err := mkfsProgram("/nonexistent/mkfs.ext4")
	if err == nil || !strings.Contains(err.Error(), "e2fsprogs") {
		t.Fatalf("got %v, want an error naming the e2fsprogs package", err)
	}
}
