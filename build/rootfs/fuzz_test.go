package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzApply feeds arbitrary bytes to Apply as one layer, on top of a
// lower layer full of symlinks that point out. Apply may fail, but must
// not panic and must not touch anything beside the root.
func FuzzApply(f *testing.F) {
	needRoot(f)
	lower := layer(f,
		dirE("./", 0o755), dirE("etc/", 0o755), fileE("etc/passwd", "root", 0o644),
		symE("abs", "/"), symE("up", "../.."), symE("etc/host", "/etc"),
		symE("side", "../sentinel"), linkE("hl", "etc/passwd"))
	f.Add(layer(f, fileE("../escape", "x", 0o644)))
	f.Add(layer(f, fileE("abs/etc/evil", "x", 0o644), fileE("up/evil", "x", 0o644)))
	f.Add(layer(f, linkE("h", "../../etc/passwd"), linkE("h2", "side/../x")))
	f.Add(layer(f, fileE("side/.wh..wh..opq", "", 0o644), fileE("up/.wh.sentinel", "", 0o644)))
	f.Add(layer(f, dirE("side/", 0o777), devE(tar.TypeFifo, "up/f", 0o600, 0, 0)))
	f.Add(sparseLayer(f, "up/big", 1<<40, false, frag{0, "x"}))
	capMinimize()
	f.Fuzz(func(t *testing.T, data []byte) {
		parent, dir := sandbox(t)
		if err := Apply(context.Background(), dir, bytes.NewReader(lower), Options{}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = Apply(ctx, dir, bytes.NewReader(data), Options{noOpenat2: len(data)%2 == 1})
		checkContained(t, parent)
		if _, err := os.Lstat(filepath.Join(filepath.Dir(parent), "evil")); err == nil {
			t.Fatal("evil created beside the sandbox")
		}
	})
}

// capMinimize caps, unless -fuzzminimizetime was given, how long the
// fuzzing engine minimizes an input. It re-runs the target for every
// candidate, and its subset pass is quadratic in the input's length; at a
// few ms a run on inputs of a few KiB (tar blocks are 512 bytes), the
// default 60 s per new input stopped all fuzzing: a 20 s run did ~25
// execs, then each worker spent the rest minimizing, its runs not counted
// until done. Minimizing only shrinks saved inputs; every run still gets
// the same checks, and failing inputs are still saved.
func capMinimize() {
	set := false
	flag.Visit(func(fl *flag.Flag) { set = set || fl.Name == "test.fuzzminimizetime" })
	if !set {
		flag.Set("test.fuzzminimizetime", "500x")
	}
}

// BenchmarkApply extracts a synthetic 100 MiB layer of 5000 files in
// 100 directories, sizes spread from 0 to 40 KiB, as a root fs has.
func BenchmarkApply(b *testing.B) {
	needRoot(b)
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 64<<10)
	rng.Read(data)
	var ents []ent
	ents = append(ents, dirE("./", 0o755))
	total := 0
	for d := 0; d < 100; d++ {
		ents = append(ents, dirE(fmt.Sprintf("usr/lib/d%03d/", d), 0o755))
		for i := 0; i < 50; i++ {
			n := rng.Intn(41940)
			total += n
			off := rng.Intn(len(data) - n)
			e := fileE(fmt.Sprintf("usr/lib/d%03d/f%03d.so", d, i), "", 0o644)
			e.hdr.Size, e.body = int64(n), data[off:off+n]
			ents = append(ents, e)
		}
	}
	l := layer(b, ents...)
	b.SetBytes(int64(len(l)))
	b.Logf("layer: %d MiB, %d entries, %d MiB of content", len(l)>>20, len(ents), total>>20)
	parent := b.TempDir()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir := filepath.Join(parent, fmt.Sprint(i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := Apply(context.Background(), dir, bytes.NewReader(l), Options{}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		os.RemoveAll(dir)
		b.StartTimer()
	}
}
