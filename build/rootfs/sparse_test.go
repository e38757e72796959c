package rootfs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// frag is a data fragment of a sparse file: len(data) bytes at off.
type frag struct {
	off  int64
	data string
}

// sparseLayer returns a layer holding one GNU sparse file, in PAX 1.0
// format (as GNU tar --sparse --posix writes it) or, with v01, PAX 0.1.
// archive/tar cannot write sparse files, so the blocks are laid out by
// hand.
func sparseLayer(t testing.TB, name string, realSize int64, v01 bool, frags ...frag) []byte {
	t.Helper()
	var m []string
	var body bytes.Buffer
	for _, f := range frags {
		m = append(m, fmt.Sprint(f.off), fmt.Sprint(len(f.data)))
	}
	recs := [][2]string{{"GNU.sparse.name", name}, {"GNU.sparse.realsize", fmt.Sprint(realSize)}}
	if v01 {
		recs = append(recs, [2]string{"GNU.sparse.major", "0"}, [2]string{"GNU.sparse.minor", "1"},
			[2]string{"GNU.sparse.numblocks", fmt.Sprint(len(frags))}, [2]string{"GNU.sparse.map", strings.Join(m, ",")})
	} else {
		recs = append(recs, [2]string{"GNU.sparse.major", "1"}, [2]string{"GNU.sparse.minor", "0"})
		body.WriteString(fmt.Sprintf("%d\n%s\n", len(frags), strings.Join(m, "\n")))
		pad(&body)
	}
	for _, f := range frags {
		body.WriteString(f.data)
	}
	var pax bytes.Buffer
	for _, r := range recs {
		rec := " " + r[0] + "=" + r[1] + "\n"
		n := len(rec) + len(fmt.Sprint(len(rec)))
		if len(fmt.Sprint(n)) != len(fmt.Sprint(len(rec))) {
			n++
		}
		fmt.Fprintf(&pax, "%d%s", n, rec)
	}
	var out bytes.Buffer
	out.Write(rawHeader("PaxHeaders.0/"+name, 'x', int64(pax.Len())))
	out.Write(pax.Bytes())
	pad(&out)
	out.Write(rawHeader("GNUSparseFile.0/"+name, '0', int64(body.Len())))
	out.Write(body.Bytes())
	pad(&out)
	out.Write(make([]byte, 1024))
	return out.Bytes()
}

func pad(b *bytes.Buffer) {
	if r := b.Len() % 512; r != 0 {
		b.Write(make([]byte, 512-r))
	}
}

// rawHeader is a ustar header block, checksum included.
func rawHeader(name string, typ byte, size int64) []byte {
	h := make([]byte, 512)
	copy(h[0:100], name)
	copy(h[100:], "0000644\x00")
	copy(h[108:], "0000000\x00")
	copy(h[116:], "0000000\x00")
	copy(h[124:], fmt.Sprintf("%011o\x00", size))
	copy(h[136:], fmt.Sprintf("%011o\x00", epoch.Unix()))
	copy(h[148:], "        ")
	h[156] = typ
	copy(h[257:], "ustar\x0000")
	sum := 0
	for _, c := range h {
		sum += int(c)
	}
	copy(h[148:], fmt.Sprintf("%06o\x00 ", sum))
	return h
}

// A sparse entry claims a logical size from a few real bytes: extracting
// it must cost what the layer holds, not what the entry claims.
func TestApplySparse(t *testing.T) {
	needRoot(t)
	for _, v01 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v01=%v", v01), func(t *testing.T) {
			const size = 64 << 20
			l := sparseLayer(t, "var/log/lastlog", size, v01, frag{4 << 20, "hello"}, frag{40 << 20, "world"})
			_, dir := sandbox(t)
			if err := Apply(context.Background(), dir, bytes.NewReader(l), Options{}); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(dir, "var/log/lastlog")
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, size)
			copy(want[4<<20:], "hello")
			copy(want[40<<20:], "world")
			if !bytes.Equal(b, want) {
				t.Errorf("content differs (len %d, want %d)", len(b), size)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			if used := st.Blocks * 512; used > 4<<20 {
				t.Errorf("lastlog uses %d bytes on disk; its holes should stay holes", used)
			}
		})
	}
	for _, tc := range []struct {
		name string
		l    []byte
	}{
		{"1 TiB, PAX 1.0", sparseLayer(t, "big", 1<<40, false, frag{0, "x"})},
		{"1 TiB, PAX 0.1", sparseLayer(t, "big", 1<<40, true, frag{1<<40 - 1, "x"})},
		{"8 EiB, PAX 1.0", sparseLayer(t, "big", 1<<63-1, false)},
		// The cap is on the layer's sparse files added up: each claim is
		// paid for in zeros read.
		{"10 GiB then 10 GiB", func() []byte {
			l := sparseLayer(t, "ok", 10<<30, false, frag{0, "x"})
			return append(l[:len(l)-1024], sparseLayer(t, "big", 10<<30, false, frag{0, "x"})...)
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, dir := sandbox(t)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			start := time.Now()
			err := Apply(ctx, dir, bytes.NewReader(tc.l), Options{})
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("Apply took %v on a %d-byte layer", d, len(tc.l))
			}
			if err == nil || !strings.Contains(err.Error(), `layer entry "big"`) || !strings.Contains(err.Error(), "sparse") {
				t.Fatalf("err = %v, want a refusal of the sparse entry big", err)
			}
		})
	}
}
