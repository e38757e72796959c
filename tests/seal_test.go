package tests

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/testimage"
	"github.com/cwrun/cwrun/internal/treesum"
)

type E = testimage.Entry

// capNetRaw is a valid security.capability value (VFS_CAP_REVISION_2,
// effective, permitted CAP_NET_RAW): the kernel refuses malformed ones.
const capNetRaw = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// multiLayer is an image with deletions, opaque folders, replacements,
// links, devices, owners, modes and xattrs across three layers.
//
// crossLink adds a hard link in layer 2 to a file of layer 1: valid in
// a layer stream, but no layered store (podman's overlay) can hold it.
func multiLayer(t *testing.T, crossLink bool) [][]byte {
	l1 := testimage.Layer(t,
		E{Name: "etc/", Type: tar.TypeDir},
		E{Name: "etc/passwd", Body: "root:x:0:0::/root:/bin/sh\n"},
		E{Name: "etc/shadow", Mode: 0o640, GID: 42, Body: "root:*:1::::::\n"},
		E{Name: "bin/", Type: tar.TypeDir},
		E{Name: "bin/tool", Mode: 0o4755, Body: "#!/bin/tool\n"},
		E{Name: "bin/link", Type: tar.TypeSymlink, Link: "tool"},
		E{Name: "bin/abs", Type: tar.TypeSymlink, Link: "/etc/passwd"},
		E{Name: "bin/hard", Type: tar.TypeLink, Link: "bin/tool", Mode: 0o4755}, // tar writers give links their file's mode; c/storage applies it,
		E{Name: "home/", Type: tar.TypeDir},
		E{Name: "home/user/", Type: tar.TypeDir, Mode: 0o700, UID: 1000, GID: 1000},
		E{Name: "home/user/notes", Mode: 0o600, UID: 1000, GID: 1000, Body: "mine\n", Xattrs: map[string]string{"user.origin": "layer1"}},
		E{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		E{Name: "dev/", Type: tar.TypeDir},
		E{Name: "dev/null", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		E{Name: "dev/loop0", Type: tar.TypeBlock, Mode: 0o660, GID: 6, Major: 7, Minor: 0},
		E{Name: "run/", Type: tar.TypeDir},
		E{Name: "run/fifo", Type: tar.TypeFifo, Mode: 0o600},
		E{Name: "usr/", Type: tar.TypeDir},
		E{Name: "usr/bin/", Type: tar.TypeDir},
		E{Name: "usr/bin/ping", Mode: 0o755, Body: "ping\n", Xattrs: map[string]string{"security.capability": capNetRaw}},
		E{Name: "opt/", Type: tar.TypeDir},
		E{Name: "opt/old/", Type: tar.TypeDir},
		E{Name: "opt/old/a", Body: "a"},
		E{Name: "opt/old/sub/", Type: tar.TypeDir},
		E{Name: "opt/old/sub/b", Body: "b"},
		E{Name: "var/", Type: tar.TypeDir},
		E{Name: "var/lib/", Type: tar.TypeDir},
		E{Name: "var/lib/data/", Type: tar.TypeDir, Mode: 0o750},
		E{Name: "var/lib/data/x", Body: "x"},
		E{Name: "var/lib/data/y/", Type: tar.TypeDir},
		E{Name: "var/lib/data/y/deep", Body: "deep"},
		E{Name: "replace-me", Body: "file"},
		E{Name: "dir-to-file/", Type: tar.TypeDir},
		E{Name: "dir-to-file/child", Body: "c"},
	)
	l2 := []E{
		E{Name: "etc/.wh.shadow"},
		E{Name: "etc/passwd", Body: "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"},
		E{Name: "opt/.wh.old"},
		E{Name: "var/lib/data/", Type: tar.TypeDir, Mode: 0o750},
		E{Name: "var/lib/data/.wh..wh..opq"},
		E{Name: "var/lib/data/z", Body: "z"},
		E{Name: "replace-me/", Type: tar.TypeDir},
		E{Name: "replace-me/inner", Body: "inner"},
		E{Name: "dir-to-file", Body: "now a file"},
	}
	if crossLink {
		l2 = append(l2, E{Name: "bin/hard2", Type: tar.TypeLink, Link: "bin/tool", Mode: 0o4755})
	}
	l3 := testimage.Layer(t,
		E{Name: "empty", Body: ""},
		E{Name: "etc/motd", Mode: 0o444, Body: "sealed\n"},
	)
	return [][]byte{l1, testimage.Layer(t, l2...), l3}
}

func sum(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:])[:12] }

// wantTree is the flattened tree of multiLayer, written by hand.
func wantTree(crossLink bool) []string {
	passwd := "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
	tree := []string{
		"/bin dir 0755 0:0",
		"/bin/abs symlink 00 0:0 -> /etc/passwd",
		"/bin/hard file 04755 0:0 " + sum("#!/bin/tool\n") + " link=/bin/hard",
		"/bin/link symlink 00 0:0 -> tool",
		"/bin/tool file 04755 0:0 " + sum("#!/bin/tool\n") + " link=/bin/hard",
		"/dev dir 0755 0:0",
		"/dev/loop0 block 0660 0:6 7:0",
		"/dev/null char 0666 0:0 1:3",
		"/dir-to-file file 0644 0:0 " + sum("now a file"),
		"/empty file 0644 0:0 " + sum(""),
		"/etc dir 0755 0:0",
		"/etc/motd file 0444 0:0 " + sum("sealed\n"),
		"/etc/passwd file 0644 0:0 " + sum(passwd),
		"/home dir 0755 0:0",
		"/home/user dir 0700 1000:1000",
		"/home/user/notes file 0600 1000:1000 " + sum("mine\n") + " user.origin=layer1",
		"/opt dir 0755 0:0",
		"/replace-me dir 0755 0:0",
		"/replace-me/inner file 0644 0:0 " + sum("inner"),
		"/run dir 0755 0:0",
		"/run/fifo fifo 0600 0:0",
		"/tmp dir 01777 0:0",
		"/usr dir 0755 0:0",
		"/usr/bin dir 0755 0:0",
		"/usr/bin/ping file 0755 0:0 " + sum("ping\n") + " security.capability=" + hex.EncodeToString([]byte(capNetRaw)),
		"/var dir 0755 0:0",
		"/var/lib dir 0755 0:0",
		"/var/lib/data dir 0750 0:0",
		"/var/lib/data/z file 0644 0:0 " + sum("z"),
	}
	if crossLink {
		tree = append(tree, "/bin/hard2 file 04755 0:0 "+sum("#!/bin/tool\n")+" link=/bin/hard")
		sort.Strings(tree)
	}
	return tree
}

// render turns treesum entries into wantTree's form.
func render(entries []treesum.Entry, ignore ...string) []string {
	var out []string
next:
	for _, e := range entries {
		for _, ig := range ignore {
			if e.Path == ig || strings.HasPrefix(e.Path, ig+"/") {
				continue next
			}
		}
		if e.Path == "/" || e.Path == "" {
			continue
		}
		typ := e.Type
		if typ == "hardlink" {
			typ = "file"
		}
		l := fmt.Sprintf("%s %s %s %d:%d", e.Path, typ, "0"+strconv.FormatUint(uint64(treesum.UnixMode(e.Mode)), 8), e.UID, e.GID)
		switch typ {
		case "file":
			l += " " + e.SHA256[:12]
		case "symlink":
			l += " -> " + e.Link
		case "char", "block":
			l += " " + e.Dev
		}
		if e.LinkGroup != "" {
			l += " link=" + e.LinkGroup
		}
		var keys []string
		for k := range e.Xattrs {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v := e.Xattrs[k]
			if strings.HasPrefix(k, "security.") {
				v = hex.EncodeToString([]byte(v))
			}
			l += " " + k + "=" + v
		}
		out = append(out, l)
	}
	sort.Strings(out)
	return out
}

func diffLines(want, got []string) string {
	w := map[string]bool{}
	for _, l := range want {
		w[l] = true
	}
	g := map[string]bool{}
	for _, l := range got {
		g[l] = true
	}
	var b strings.Builder
	for _, l := range want {
		if !g[l] {
			fmt.Fprintf(&b, "  missing: %s\n", l)
		}
	}
	for _, l := range got {
		if !w[l] {
			fmt.Fprintf(&b, "  extra:   %s\n", l)
		}
	}
	return b.String()
}

// luksLayout reads the payload offset and encryption sector size from
// cryptsetup's luksDump.
func luksLayout(t *testing.T, disk string) (offset int64, sector int) {
	t.Helper()
	dump := mustRun(t, "cryptsetup", "luksDump", disk)
	if m := regexp.MustCompile(`Payload offset:\s+(\d+)`).FindStringSubmatch(dump); m != nil { // LUKS1: 512-byte sectors
		n, _ := strconv.ParseInt(m[1], 10, 64)
		return n * 512, 512
	}
	seg := dump[strings.Index(dump, "Data segments:"):]
	mo := regexp.MustCompile(`offset:\s+(\d+) \[bytes\]`).FindStringSubmatch(seg)
	ms := regexp.MustCompile(`sector:\s+(\d+) \[bytes\]`).FindStringSubmatch(seg)
	if mo == nil || ms == nil {
		t.Fatalf("no data segment in luksDump:\n%s", dump)
	}
	offset, _ = strconv.ParseInt(mo[1], 10, 64)
	sector, _ = strconv.Atoi(ms[1])
	return offset, sector
}

// volumeKey asks cryptsetup, the judge, for the disk's volume key.
func volumeKey(t *testing.T, disk, keyFile string) string {
	t.Helper()
	dump := mustRun(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, disk)
	i := strings.Index(dump, "MK dump:")
	if i < 0 {
		t.Fatalf("no MK dump in:\n%s", dump)
	}
	var hexKey strings.Builder
	for _, line := range strings.Split(dump[i+len("MK dump:"):], "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !regexp.MustCompile(`^[0-9a-f]{2}$`).MatchString(f[0]) {
			if hexKey.Len() > 0 {
				break
			}
			continue
		}
		for _, b := range f {
			hexKey.WriteString(b)
		}
	}
	if hexKey.Len() != 128 {
		t.Fatalf("volume key of %d hex digits, want 128 (512 bits)", hexKey.Len())
	}
	return hexKey.String()
}

// xtsDecrypt is an AES-XTS-plain64 decryption that is not cwrun's:
// Debian's python3-cryptography. The tweak is the 512-byte sector
// number, whatever the encryption sector size (dm-crypt's default).
const xtsDecrypt = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex(sys.stdin.readline().strip())
src, dst, off, size, sector = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(src, "rb") as f, open(dst, "wb") as o:
    f.seek(off)
    pos = 0
    while pos < size:
        chunk = f.read(min(1 << 20, size - pos))
        out = bytearray()
        for i in range(0, len(chunk), sector):
            tweak = ((pos + i) // 512).to_bytes(16, "little")
            d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
            out += d.update(chunk[i:i + sector]) + d.finalize()
        o.write(out)
        pos += len(chunk)
`

func decryptPayload(t *testing.T, disk, key, out string, offset, size int64, sector int) {
	t.Helper()
	cmd := exec.Command("/usr/bin/python3", "-c", xtsDecrypt, disk, out,
		strconv.FormatInt(offset, 10), strconv.FormatInt(size, 10), strconv.Itoa(sector))
	cmd.Stdin = strings.NewReader(key + "\n")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("python3-cryptography decrypt: %v\n%s", err, b)
	}
}

// exportDisk takes disk.img out of a sealed image in local storage the
// way a user would: podman create + podman export.
func exportDisk(t *testing.T, s store, image, dir string) string {
	t.Helper()
	ctr := strings.TrimSpace(s.podman(t, "create", image))
	defer s.podman(t, "rm", ctr)
	tarPath := filepath.Join(dir, "export.tar")
	s.podman(t, "export", "-o", tarPath, ctr)
	mustRun(t, "tar", "-C", dir, "-xf", tarPath, "disk.img", "krun-sev.json", "entrypoint")
	os.Remove(tarPath)
	return filepath.Join(dir, "disk.img")
}

// mountRO loop-mounts an ext4 image read-only and returns the mount point.
func mountRO(t *testing.T, img string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "mount", "-o", "loop,ro", "-t", "ext4", img, mnt)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

func TestSealMultiLayerImage(t *testing.T) {
	need(t, "cryptsetup", "podman", "skopeo", "mkfs.ext4", "/usr/bin/python3")
	needRoot(t)
	if err := exec.Command("/usr/bin/python3", "-c", "import cryptography").Run(); err != nil {
		t.Skip("python3-cryptography not installed (make deps installs it)")
	}
	for _, tc := range []struct{ luksVersion, source string }{
		{"1", "oci"}, {"2", "oci"},
		// From local storage the image is mounted, not extracted.
		{"2", "containers-storage"},
	} {
		luksVersion := tc.luksVersion
		crossLink := tc.source == "oci"
		t.Run("luks"+luksVersion+"-"+tc.source, func(t *testing.T) {
			dir := t.TempDir()
			layout := filepath.Join(dir, "src")
			testimage.WriteLayout(t, layout, "v1", testimage.Config{
				Cmd: []string{"/bin/tool", "--serve"}, Env: []string{"PATH=/bin", "SECRET_MODE=on"}, WorkingDir: "/home/user",
			}, multiLayer(t, crossLink)...)
			s := newStore(t)
			key := writeKey(t, dir, "correct horse battery staple")

			src := "oci:" + layout + ":v1"
			if tc.source == "containers-storage" {
				mustRun(t, "skopeo", "copy", "-q", src, "containers-storage:["+"overlay@"+s.root+"+"+s.runRoot+"]localhost/multi:src")
				src = "localhost/multi:src"
			}
			r := s.cwrun(t, "build", "--tee", "sample", "--luks", luksVersion, "--passphrase-file", key,
				"--workload-id", "wl-"+luksVersion, src, "localhost/multi:sealed")
			if r.code != 0 {
				t.Fatalf("cwrun build: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
			}
			if strings.Contains(r.stdout+r.stderr, "correct horse") {
				t.Fatal("the passphrase was printed")
			}
			if !strings.Contains(s.podman(t, "images", "--format", "{{.Repository}}:{{.Tag}}"), "localhost/multi:sealed") {
				t.Fatal("podman images does not list the sealed image")
			}
			// Outside, the image config says nothing of the workload.
			cfg := s.podman(t, "image", "inspect", "--format", "{{json .Config}}", "localhost/multi:sealed")
			for _, leak := range []string{"SECRET_MODE", "/bin/tool", "/home/user"} {
				if strings.Contains(cfg, leak) {
					t.Errorf("sealed image config leaks %q: %s", leak, cfg)
				}
			}

			work := t.TempDir()
			disk := exportDisk(t, s, "localhost/multi:sealed", work)
			dump := mustRun(t, "cryptsetup", "luksDump", disk)
			if !strings.Contains(dump, "Version:       \t"+luksVersion) && !strings.Contains(dump, "Version:        "+luksVersion) &&
				!regexp.MustCompile(`Version:\s+`+luksVersion).MatchString(dump) {
				t.Fatalf("luksDump does not say version %s:\n%s", luksVersion, dump)
			}
			if !strings.Contains(dump, "xts-plain64") {
				t.Fatalf("luksDump: not aes-xts-plain64:\n%s", dump)
			}
			if r := run(t, 2*time.Minute, "cryptsetup", "open", "--test-passphrase", "--key-file", key, disk); r.code != 0 {
				t.Fatalf("cryptsetup rejects the right passphrase: %s", r.stderr)
			}
			wrong := filepath.Join(work, "wrong")
			os.WriteFile(wrong, []byte("correct horse battery stapler"), 0o600)
			if r := run(t, 2*time.Minute, "cryptsetup", "open", "--test-passphrase", "--key-file", wrong, disk); r.code == 0 {
				t.Fatal("cryptsetup accepts a wrong passphrase")
			}

			// cryptsetup gives the key, python decrypts, the kernel mounts.
			vk := volumeKey(t, disk, key)
			offset, sector := luksLayout(t, disk)
			var footer struct {
				Tee string `json:"tee"`
				WID string `json:"workload_id"`
			}
			kj, err := os.ReadFile(filepath.Join(work, "krun-sev.json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(kj, &footer); err != nil || footer.Tee != "sample" || footer.WID != "wl-"+luksVersion {
				t.Fatalf("krun-sev.json %s: %v", kj, err)
			}
			fi, _ := os.Stat(disk)
			plain := filepath.Join(work, "plain.img")
			payload := (fi.Size() - int64(len(kj)) - 12 - offset) / 4096 * 4096
			decryptPayload(t, disk, vk, plain, offset, payload, sector)
			mnt := mountRO(t, plain)
			got, err := treesum.Dir(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if d := diffLines(wantTree(crossLink), render(got, "/lost+found", "/.krun_config.json")); d != "" {
				t.Fatalf("sealed tree differs from the image's flattened tree:\n%s", d)
			}
			// Hard links stay hard links.
			a, _ := os.Stat(filepath.Join(mnt, "bin/tool"))
			b, _ := os.Stat(filepath.Join(mnt, "bin/hard"))
			if !os.SameFile(a, b) {
				t.Error("bin/hard is no longer a hard link of bin/tool")
			}
			// The source config travels inside the disk.
			var kc struct {
				Config struct {
					Cmd        []string
					Env        []string
					WorkingDir string
				} `json:"config"`
			}
			b2, err := os.ReadFile(filepath.Join(mnt, ".krun_config.json"))
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(b2, &kc); err != nil || strings.Join(kc.Config.Cmd, " ") != "/bin/tool --serve" ||
				kc.Config.WorkingDir != "/home/user" || !strings.Contains(strings.Join(kc.Config.Env, ","), "SECRET_MODE=on") {
				t.Fatalf("/.krun_config.json: %s (%v)", b2, err)
			}
			// The entrypoint refuses, as buildah's does.
			out, err := exec.Command(filepath.Join(work, "entrypoint")).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "confidential workload") {
				t.Fatalf("/entrypoint: %v %q", err, out)
			}
		})
	}
}
