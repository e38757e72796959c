package luks

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// overlay reads top where it has bytes and base (then zeros up to base's
// length) elsewhere: fuzz inputs stay small headers while reads of keyslot
// material and JSON areas still find something.
type overlay struct{ top, base []byte }

func (o overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	size := int64(max(len(o.top), len(o.base)))
	if off >= size {
		return 0, io.EOF
	}
	n := 0
	if off < int64(len(o.top)) {
		n = copy(p, o.top[off:])
	}
	if pos := off + int64(n); n < len(p) && pos < int64(len(o.base)) {
		n += copy(p[n:], o.base[pos:])
	}
	if pos := off + int64(n); n < len(p) && pos < size {
		m := min(int64(len(p)-n), size-pos)
		clear(p[n : n+int(m)])
		n += int(m)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

const fuzzPass = "fuzz-passphrase"

// fuzzVolume is a deterministic volume with a 1-iteration keyslot.
func fuzzVolume(tb testing.TB, version int) []byte {
	v, err := New([]byte(fuzzPass), 1<<20, Params{Version: version, Iterations: 1,
		Rand: mrand.NewChaCha8([32]byte{byte(version)}), UUID: "f0220000-0000-4000-8000-000000000000"})
	if err != nil {
		tb.Fatal(err)
	}
	return v.Header()
}

// headerPrefix is what a fuzz seed keeps of a header: the part the parser
// reads before keyslot material, trailing zeros dropped.
func headerPrefix(hdr []byte) []byte {
	n := luks1HeaderLen
	if len(hdr) >= 8 && hdr[7] == 2 {
		n = luks2HdrSize
	}
	return bytes.TrimRight(hdr[:min(n, len(hdr))], "\x00")
}

func FuzzParse(f *testing.F) {
	for _, v := range []int{1, 2} {
		f.Add(headerPrefix(fuzzVolume(f, v)))
	}
	pad := make([]byte, 64<<10)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, r := range []io.ReaderAt{bytes.NewReader(data), overlay{top: data, base: pad}} {
			info, err := Parse(r)
			if err != nil {
				continue
			}
			if info.Version != 1 && info.Version != 2 || info.PayloadOffset < 0 || info.PayloadSize < 0 || info.KeyBits > 8*maxKeyBytes {
				t.Fatalf("Parse accepted an impossible header: %+v", info)
			}
		}
	})
}

func FuzzOpen(f *testing.F) {
	bases := map[byte][]byte{1: fuzzVolume(f, 1), 2: fuzzVolume(f, 2)}
	for _, b := range bases {
		f.Add(headerPrefix(b))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		base := bases[2]
		if len(data) >= 8 && data[7] == 1 {
			base = bases[1]
		}
		v, err := open(overlay{top: data, base: base}, []byte(fuzzPass), 16)
		if err != nil {
			return
		}
		defer v.Wipe()
		if len(v.VolumeKey()) == 0 || v.Info().SectorSize == 0 {
			t.Fatalf("Open succeeded with an unusable volume: %+v", v.Info())
		}
		buf := make([]byte, v.Info().SectorSize)
		if err := v.DecryptSectors(buf, 0); err != nil {
			t.Fatal(err)
		}
	})
}

// TestWriteFuzzSeeds regenerates testdata/fuzz/FuzzParse from headers made
// by cryptsetup, by cwrun and by buildah mkcw. Run it with
// LUKS_WRITE_FUZZ_SEEDS=1 after a format change.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("LUKS_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set LUKS_WRITE_FUZZ_SEEDS=1 to regenerate testdata/fuzz/FuzzParse")
	}
	needCryptsetup(t)
	seeds := map[string][]byte{"cwrun-luks1": fuzzVolume(t, 1), "cwrun-luks2": fuzzVolume(t, 2)}
	dir := t.TempDir()
	passFile := writeFile(t, dir, "pass", []byte(fuzzPass))
	for name, args := range map[string][]string{
		"cryptsetup-luks1":          {"--type", "luks1", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"},
		"cryptsetup-luks2":          {"--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "4096"},
		"cryptsetup-luks2-argon2id": {"--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1"},
	} {
		img := filepath.Join(dir, "img")
		if err := os.WriteFile(img, make([]byte, 20<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		a := append([]string{"luksFormat", "--batch-mode", "--key-file", passFile}, args...)
		if out, err := cryptsetup(t, append(a, img)...); err != nil {
			t.Fatalf("luksFormat %v: %v\n%s", args, err, out)
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		seeds[name] = b
	}
	if _, err := os.Stat("../../../shared/fixtures/mkcw-busybox.oci.tar"); err == nil {
		seeds["mkcw-luks1"] = extractMkcwDisk(t, "../../../shared/fixtures/mkcw-busybox.oci.tar")
	}
	out := filepath.Join("testdata", "fuzz", "FuzzParse")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range seeds {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", headerPrefix(b))
		if err := os.WriteFile(filepath.Join(out, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
