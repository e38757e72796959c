package luks

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/xts"
)

var interopCases = []struct {
	name       string
	p          Params
	sectorSize int
	dump       []string // lines luksDump must print
}{
	{"luks1", Params{Version: 1}, 512, []string{"Version:       \t1", "Cipher name:   \taes", "Cipher mode:   \txts-plain64", "Hash spec:     \tsha256", "Payload offset:\t4040", "MK bits:       \t512", "AF stripes:            \t4000"}},
	{"luks2-4096", Params{}, 4096, []string{"Version:       \t2", "cipher: aes-xts-plain64", "sector: 4096 [bytes]", "offset: 290816 [bytes]", "PBKDF:      pbkdf2", "Iterations: 1000", "AF stripes: 4000"}},
	{"luks2-512", Params{Version: 2, SectorSize: 512, Iterations: 1234}, 512, []string{"Version:       \t2", "cipher: aes-xts-plain64", "sector: 512 [bytes]", "Iterations: 1234"}},
}

// TestCryptsetupJudgesOurVolumes writes volumes with New + EncryptFile and
// has cryptsetup and python3-cryptography check them.
func TestCryptsetupJudgesOurVolumes(t *testing.T) {
	needCryptsetup(t)
	for _, tc := range interopCases {
		t.Run(tc.name, func(t *testing.T) {
			const size = 3 << 20
			pass := randPassphrase(t)
			v, err := New(pass, size, tc.p)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Wipe()
			if got := int64(len(v.Header())); got != v.PayloadOffset() {
				t.Fatalf("Header() is %d bytes, PayloadOffset() %d", got, v.PayloadOffset())
			}
			img, plain := makeDisk(t, v, size)
			dir := t.TempDir()
			passFile := writeFile(t, dir, "pass", pass)
			wrongFile := writeFile(t, dir, "wrong", append(bytes.Clone(pass[:63]), 'x'))

			// 1. luksDump parses it and shows what we wrote.
			out, err := cryptsetup(t, "luksDump", img)
			if err != nil {
				t.Fatalf("luksDump: %v\n%s", err, out)
			}
			want := append([]string{"UUID:          \t" + v.Info().UUID}, tc.dump...)
			if tc.p.Version != 1 {
				want = append(want, fmt.Sprintf("length: %d [bytes]", size))
			}
			for _, w := range want {
				if !strings.Contains(out, w) {
					t.Errorf("luksDump lacks %q:\n%s", w, out)
				}
			}

			// 2. The right passphrase opens it, a wrong one does not.
			if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file", passFile, img); err != nil {
				t.Fatalf("cryptsetup rejects the right passphrase: %v\n%s", err, out)
			}
			if out, err := cryptsetup(t, "open", "--test-passphrase", "--key-file", wrongFile, img); err == nil {
				t.Fatalf("cryptsetup accepts a wrong passphrase:\n%s", out)
			}

			// 3. cryptsetup's volume key is ours, and another AES-XTS
			// implementation decrypts our payload with it.
			key := dumpVolumeKey(t, img, passFile)
			if !bytes.Equal(key, v.VolumeKey()) {
				t.Fatalf("cryptsetup's volume key %x, ours %x", key, v.VolumeKey())
			}
			py := needPyCryptography(t)
			outFile := filepath.Join(dir, "plain")
			cmd := exec.Command(py, "testdata/xts_decrypt.py", img, strconv.FormatInt(v.PayloadOffset(), 10),
				strconv.Itoa(size), strconv.Itoa(tc.sectorSize), outFile)
			cmd.Stdin = strings.NewReader(hex.EncodeToString(key) + "\n")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("python3 xts_decrypt.py: %v\n%s", err, out)
			}
			got, err := os.ReadFile(outFile)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("python3-cryptography's decryption of our payload differs from the plaintext")
			}
		})
	}
}

// TestRoundTrip opens our own volumes without external tools.
func TestRoundTrip(t *testing.T) {
	for _, tc := range interopCases {
		t.Run(tc.name, func(t *testing.T) {
			const size = 2<<20 + 8192
			pass := randPassphrase(t)
			v, err := New(pass, size, tc.p)
			if err != nil {
				t.Fatal(err)
			}
			img, plain := makeDisk(t, v, size)
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()

			info, err := Parse(f)
			if err != nil {
				t.Fatal(err)
			}
			if info != v.Info() {
				t.Fatalf("Parse = %+v, New's Info = %+v", info, v.Info())
			}
			if info.SectorSize != tc.sectorSize || info.CipherSpec() != "aes-xts-plain64" || info.KeyBits != 512 {
				t.Fatalf("Info %+v", info)
			}

			if _, err := Open(f, []byte("not the passphrase")); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("Open with a wrong passphrase: %v, want ErrWrongPassphrase", err)
			}
			o, err := Open(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(o.VolumeKey(), v.VolumeKey()) {
				t.Fatal("Open recovered a different volume key")
			}
			if o.Header() != nil {
				t.Error("Header() of an opened volume is not nil")
			}
			pr := o.PayloadReader(f)
			all := make([]byte, size)
			if n, err := pr.ReadAt(all, 0); n != size || (err != nil && err != io.EOF) {
				t.Fatalf("PayloadReader.ReadAt whole payload: %d, %v", n, err)
			}
			if !bytes.Equal(all, plain) {
				t.Fatal("PayloadReader returned something else than the plaintext")
			}
			// Unaligned reads at random places.
			r := mrand.New(mrand.NewPCG(1, 2))
			for range 50 {
				off := r.Int64N(size)
				n := r.Int64N(min(size-off, 20000)) + 1
				b := make([]byte, n)
				if got, err := pr.ReadAt(b, off); got != int(n) || (err != nil && err != io.EOF) {
					t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, got, err)
				}
				if !bytes.Equal(b, plain[off:off+n]) {
					t.Fatalf("ReadAt(%d bytes at %d) differs from the plaintext", n, off)
				}
			}
			if tc.p.Version == 2 {
				// The segment has a fixed size: the footer is not payload.
				if n, err := pr.ReadAt(make([]byte, 10), size-5); n != 5 || err != io.EOF {
					t.Fatalf("read across the payload end: %d, %v; want 5, EOF", n, err)
				}
			}
			buf := make([]byte, tc.sectorSize*2)
			if _, err := f.ReadAt(buf, o.PayloadOffset()+int64(tc.sectorSize)); err != nil {
				t.Fatal(err)
			}
			if err := o.DecryptSectors(buf, int64(tc.sectorSize)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, plain[tc.sectorSize:3*tc.sectorSize]) {
				t.Fatal("DecryptSectors differs from the plaintext")
			}
			if err := o.DecryptSectors(buf[:100], 0); err == nil {
				t.Fatal("DecryptSectors accepted a partial sector")
			}
			o.Wipe()
			if o.VolumeKey() != nil || o.DecryptSectors(buf, 0) == nil {
				t.Fatal("a wiped volume still has a key or decrypts")
			}
		})
	}
}

// TestReadCryptsetupVolumes reads headers that cryptsetup made.
func TestReadCryptsetupVolumes(t *testing.T) {
	needCryptsetup(t)
	cases := []struct {
		name       string
		args       []string
		version    int
		sectorSize int
	}{
		{"luks1", []string{"--type", "luks1"}, 1, 512},
		{"luks2-4096", []string{"--type", "luks2", "--sector-size", "4096"}, 2, 4096},
		{"luks2-512", []string{"--type", "luks2", "--sector-size", "512"}, 2, 512},
		{"luks2-sha512", []string{"--type", "luks2", "--hash", "sha512", "--sector-size", "4096"}, 2, 4096},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img")
			if err := os.WriteFile(img, make([]byte, 20<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			pass := randPassphrase(t)
			passFile := writeFile(t, dir, "pass", pass)
			args := append([]string{"luksFormat", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode", "--key-file", passFile}, tc.args...)
			if out, err := cryptsetup(t, append(args, img)...); err != nil {
				t.Fatalf("luksFormat: %v\n%s", err, out)
			}
			want := dumpVolumeKey(t, img, passFile)
			uuid, err := cryptsetup(t, "luksUUID", img)
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			v, err := Open(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(v.VolumeKey(), want) {
				t.Fatalf("Open's key %x, cryptsetup's %x", v.VolumeKey(), want)
			}
			i := v.Info()
			wantOff := int64(16 << 20)
			if tc.version == 1 {
				wantOff = 4096 * 512
			}
			if i.Version != tc.version || i.SectorSize != tc.sectorSize || i.CipherSpec() != "aes-xts-plain64" ||
				i.KeyBits != 512 || i.Iterations != 1000 || i.Keyslots != 1 || i.UUID != strings.TrimSpace(uuid) ||
				i.PayloadOffset != wantOff || i.PayloadSize != 0 {
				t.Fatalf("Info %+v", i)
			}
			if _, err := Open(f, pass[1:]); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: %v", err)
			}
		})
	}
}

// TestArgon2Keyslot checks that a keyslot cwrun cannot read is named in the
// error, and that Parse still describes the volume.
func TestArgon2Keyslot(t *testing.T) {
	needCryptsetup(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, make([]byte, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	pass := randPassphrase(t)
	passFile := writeFile(t, dir, "pass", pass)
	if out, err := cryptsetup(t, "luksFormat", "--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4",
		"--pbkdf-memory", "32", "--pbkdf-parallel", "1", "--batch-mode", "--key-file", passFile, img); err != nil {
		t.Fatalf("luksFormat: %v\n%s", err, out)
	}
	info, err := Parse(fileReader(t, img))
	if err != nil || info.Keyslots != 1 || info.Iterations != 0 {
		t.Fatalf("Parse = %+v, %v", info, err)
	}
	_, err = Open(fileReader(t, img), pass)
	var ue *UnsupportedError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "keyslot 0 uses argon2id") {
		t.Fatalf("Open: %v, want an UnsupportedError naming argon2id", err)
	}
}

func fileReader(t testing.TB, path string) io.ReaderAt {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestMkcwFixture opens the disk of an image sealed by buildah mkcw.
func TestMkcwFixture(t *testing.T) {
	const archive = "../../../shared/fixtures/mkcw-busybox.oci.tar"
	if _, err := os.Stat(archive); err != nil {
		t.Skipf("fixture %s absent (%v): it lives beside the project, in shared/fixtures", archive, err)
	}
	if testing.Short() {
		t.Skip("-short: unlocking 2.3 million PBKDF2 iterations takes seconds")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, extractMkcwDisk(t, archive), 0o600); err != nil {
		t.Fatal(err)
	}
	f := fileReader(t, img)
	v, err := Open(f, []byte("fixture-passphrase-0123456789"))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Wipe()
	i := v.Info()
	if i.Version != 1 || i.Cipher != "aes" || i.Mode != "xts-plain64" || i.KeyBits != 512 || i.Hash != "sha256" || i.Iterations < 100000 {
		t.Fatalf("Info %+v", i)
	}
	var sb [2]byte
	if _, err := v.PayloadReader(f).ReadAt(sb[:], 1024+56); err != nil {
		t.Fatal(err)
	}
	if sb != [2]byte{0x53, 0xef} {
		t.Fatalf("payload has %x where an ext4 superblock has its magic 53ef", sb)
	}
}

func TestXTSMatchesXCrypto(t *testing.T) {
	for _, keyLen := range []int{32, 64} {
		key := make([]byte, keyLen)
		rand.Read(key)
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		ours, err := newXTS(key)
		if err != nil {
			t.Fatal(err)
		}
		for _, sec := range []uint64{0, 1, 7, 1 << 40, ^uint64(0)} {
			plain := make([]byte, 4096)
			rand.Read(plain)
			want := make([]byte, len(plain))
			ref.Encrypt(want, plain, sec)
			got := bytes.Clone(plain)
			ours.encrypt(got, sec)
			if !bytes.Equal(got, want) {
				t.Fatalf("key %d bits sector %d: encryption differs from x/crypto/xts", keyLen*8, sec)
			}
			ours.decrypt(got, sec)
			if !bytes.Equal(got, plain) {
				t.Fatalf("key %d bits sector %d: decrypt(encrypt(x)) != x", keyLen*8, sec)
			}
		}
	}
}

func TestPBKDF2MatchesStdlib(t *testing.T) {
	for _, h := range []func() hash.Hash{sha1.New, sha256.New, sha512.New} {
		for _, n := range []int{1, 2, 1000} {
			for _, kl := range []int{20, 32, 64, 100} {
				want, err := pbkdf2.Key(h, "passphrase", []byte("salt"), n, kl)
				if err != nil {
					t.Fatal(err)
				}
				if got := pbkdf2Key(h, []byte("passphrase"), []byte("salt"), n, kl); !bytes.Equal(got, want) {
					t.Fatalf("pbkdf2Key(iter %d, len %d) differs from crypto/pbkdf2", n, kl)
				}
			}
		}
	}
}

func TestAFRoundTrip(t *testing.T) {
	for _, kl := range []int{32, 64} {
		key := make([]byte, kl)
		rand.Read(key)
		split, err := afSplit(rand.Reader, key, afStripes, sha256.New)
		if err != nil {
			t.Fatal(err)
		}
		if got := afMerge(split, kl, afStripes, sha256.New); !bytes.Equal(got, key) {
			t.Fatal("afMerge(afSplit(key)) != key")
		}
		split[len(split)/2] ^= 1
		if got := afMerge(split, kl, afStripes, sha256.New); bytes.Equal(got, key) {
			t.Fatal("a damaged stripe still merges to the key")
		}
	}
}

func TestNewRejects(t *testing.T) {
	pass := []byte("p")
	for _, tc := range []struct {
		size int64
		p    Params
		want string
	}{
		{4096 + 512, Params{}, "round it up to 8192"},
		{0, Params{}, "positive multiple"},
		{1000, Params{Version: 1}, "round it up to 1024"},
		{4096, Params{Version: 1, SectorSize: 4096}, "LUKS1 has 512-byte sectors"},
		{4096, Params{Version: 3}, "version 3"},
		{4096, Params{SectorSize: 1024}, "sector size 1024"},
		{4096, Params{Iterations: -1}, "iterations -1"},
	} {
		if _, err := New(pass, tc.size, tc.p); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%d, %+v) = %v, want an error containing %q", tc.size, tc.p, err, tc.want)
		}
	}
	if _, err := New(nil, 4096, Params{}); err == nil {
		t.Error("New accepted an empty passphrase")
	}
}

// TestDeterministic checks that Params.Rand and UUID are honoured.
func TestDeterministic(t *testing.T) {
	mk := func() []byte {
		v, err := New([]byte("p"), 4096, Params{Rand: mrand.NewChaCha8([32]byte{1}), UUID: "12345678-1234-1234-1234-123456789abc"})
		if err != nil {
			t.Fatal(err)
		}
		return v.Header()
	}
	a, b := mk(), mk()
	if !bytes.Equal(a, b) || !bytes.Contains(a[:4096], []byte("12345678-1234-1234-1234-123456789abc")) {
		t.Fatal("same Rand and UUID gave different headers, or the UUID is missing")
	}
}

// TestLUKS2SecondaryHeader damages the primary header: Parse falls back to
// the secondary copy; damaging both fails with a FormatError.
func TestLUKS2SecondaryHeader(t *testing.T) {
	v, err := New([]byte("p"), 4096, Params{})
	if err != nil {
		t.Fatal(err)
	}
	hdr := v.Header()
	hdr[5000] ^= 1 // inside the primary JSON area
	if _, err := Open(bytes.NewReader(hdr), []byte("p")); err != nil {
		t.Fatalf("Open with a damaged primary header: %v", err)
	}
	hdr[luks2HdrSize+5000] ^= 1
	var fe *FormatError
	if _, err := Parse(bytes.NewReader(hdr)); !errors.As(err, &fe) {
		t.Fatalf("Parse with both headers damaged: %v, want a FormatError", err)
	}
}

func TestNotLUKS(t *testing.T) {
	for _, b := range [][]byte{nil, make([]byte, 4096), []byte("LUKS")} {
		if _, err := Parse(bytes.NewReader(b)); !errors.Is(err, ErrNotLUKS) {
			t.Errorf("Parse(%d bytes) = %v, want ErrNotLUKS", len(b), err)
		}
	}
}

func TestEncryptFileCancelled(t *testing.T) {
	v, err := New([]byte("p"), 8<<20, Params{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "d"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(8 << 20); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := v.EncryptFile(ctx, f, 0, 8<<20, 2); !errors.Is(err, context.Canceled) {
		t.Fatalf("EncryptFile with a cancelled context: %v", err)
	}
	// A payload that runs past the end of the file is an error, not a
	// silent partial encryption.
	if err := v.EncryptFile(context.Background(), f, 4096, 8<<20, 2); err == nil || !strings.Contains(err.Error(), "reading payload") {
		t.Fatalf("EncryptFile past EOF: %v", err)
	}
}

func BenchmarkXTS(b *testing.B) {
	key := make([]byte, 64)
	rand.Read(key)
	buf := make([]byte, 4096)
	b.Run("ours", func(b *testing.B) {
		c, _ := newXTS(key)
		b.SetBytes(int64(len(buf)))
		for i := 0; b.Loop(); i++ {
			c.encrypt(buf, uint64(i))
		}
	})
	b.Run("x-crypto-xts", func(b *testing.B) {
		c, _ := xts.NewCipher(aes.NewCipher, key)
		b.SetBytes(int64(len(buf)))
		for i := 0; b.Loop(); i++ {
			c.Encrypt(buf, buf, uint64(i))
		}
	})
}

func BenchmarkEncryptFile(b *testing.B) {
	const size = 64 << 20
	v, err := New([]byte("p"), size, Params{})
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.Create(filepath.Join(b.TempDir(), "d"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	for b.Loop() {
		if err := v.EncryptFile(context.Background(), f, 0, size, 0); err != nil {
			b.Fatal(err)
		}
	}
}
