package guest

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/build/luks"
	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/sealed"
)

func TestCryptParams(t *testing.T) {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i)
	}
	hexKey := "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
	for _, c := range []struct {
		info luks.Info
		want string
	}{
		{luks.Info{Version: 1, Cipher: "aes", Mode: "xts-plain64", SectorSize: 512, PayloadOffset: 4096 * 512},
			"aes-xts-plain64 " + hexKey + " 0 /dev/vda 4096"},
		{luks.Info{Version: 2, Cipher: "aes", Mode: "xts-plain64", SectorSize: 4096, PayloadOffset: 16 << 20},
			"aes-xts-plain64 " + hexKey + " 0 /dev/vda 32768 1 sector_size:4096"},
	} {
		if got := string(cryptParams(c.info, key, "/dev/vda")); got != c.want {
			t.Errorf("LUKS%d: got %q\nwant %q", c.info.Version, got, c.want)
		}
	}
}

func TestPayloadLength(t *testing.T) {
	l1 := luks.Info{Version: 1, SectorSize: 512, PayloadOffset: 2 << 20}
	l2 := luks.Info{Version: 2, SectorSize: 4096, PayloadOffset: 16 << 20}
	for _, c := range []struct {
		name           string
		info           luks.Info
		footerAt, size int64
		want           int64
		bad            bool
	}{
		{"luks1 footer", l1, 12<<20 + 8192, 12<<20 + 8192 + 300, 10<<20 + 8192, false},
		{"luks1 no footer: to the end", l1, -1, 12<<20 + 1000, 10<<20 + 512, false},
		{"luks2 fixed", luks.Info{Version: 2, SectorSize: 4096, PayloadOffset: 16 << 20, PayloadSize: 8 << 20}, -1, 30 << 20, 8 << 20, false},
		{"luks2 dynamic, no footer, 4k sectors", l2, -1, 20<<20 + 1000, 4 << 20, false},
		{"fixed size beyond the device", luks.Info{SectorSize: 512, PayloadOffset: 1 << 20, PayloadSize: 8 << 20}, -1, 4 << 20, 0, true},
		{"footer before the payload", l1, 1 << 20, 4 << 20, 0, true},
	} {
		got, err := payloadLength(c.info, c.footerAt, c.size)
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("%s: got %d, %v; want %d (error %v)", c.name, got, err, c.want, c.bad)
		}
	}
}

func TestReadFooterPadded(t *testing.T) {
	js := []byte(`{"tee":"snp","cwrun":{"allow_overrides":true}}`)
	disk := make([]byte, 8192)
	disk = append(disk, sealed.Footer(int64(len(disk)), js)...)
	_, wantAt, err := sealed.ReadFooter(strings.NewReader(string(disk)), int64(len(disk)))
	if err != nil {
		t.Fatal(err)
	}
	for _, pad := range []int{0, 1, 300, (512 - len(disk)%512) % 512} {
		d := append(append([]byte{}, disk...), make([]byte, pad)...)
		raw, at, err := readFooter(strings.NewReader(string(d)), int64(len(d)))
		if err != nil || string(raw) != string(js) || at != wantAt {
			t.Errorf("pad %d: %q at %d, %v", pad, raw, at, err)
		}
	}
	// Cut off: no footer, and no error beyond ErrNoFooter.
	if _, _, err := readFooter(strings.NewReader(string(disk[:len(disk)-5])), int64(len(disk)-5)); err != sealed.ErrNoFooter {
		t.Errorf("truncated footer: %v", err)
	}
	// 600 zero bytes after the trailer: beyond a sector's padding.
	d := append(append([]byte{}, disk...), make([]byte, 600)...)
	if _, _, err := readFooter(strings.NewReader(string(d)), int64(len(d))); err != sealed.ErrNoFooter {
		t.Errorf("footer 600 bytes before the end was accepted: %v", err)
	}
}

func TestDMBuffer(t *testing.T) {
	b := dmBuffer("cwrun-root", dmSecureDataFlag, []dmTarget{{Start: 0, Length: 2048, Type: "crypt", Params: []byte("aes-xts-plain64 00 0 /dev/vda 8")}})
	le := binary.LittleEndian
	if le.Uint32(b[0:]) != 4 || int(le.Uint32(b[12:])) != len(b) || le.Uint32(b[16:]) != dmIoctlSize || le.Uint32(b[20:]) != 1 || le.Uint32(b[28:]) != dmSecureDataFlag {
		t.Fatalf("dm_ioctl header wrong: % x", b[:32])
	}
	if string(b[48:58]) != "cwrun-root" || b[58] != 0 {
		t.Fatalf("name: %q", b[48:60])
	}
	spec := b[dmIoctlSize:]
	if le.Uint64(spec[8:]) != 2048 || string(spec[24:29]) != "crypt" || !strings.HasPrefix(string(spec[dmTargetSize:]), "aes-xts-plain64 00 0 /dev/vda 8\x00") {
		t.Fatalf("target spec wrong: %q", spec)
	}
	if len(b)%8 != 0 || int(le.Uint32(spec[20:])) != len(spec) {
		t.Fatalf("size %d, next %d", len(b), le.Uint32(spec[20:]))
	}
	if dmIoc(dmTableLoad) != 0xc138fd09 {
		t.Fatalf("DM_TABLE_LOAD = %#x", dmIoc(dmTableLoad))
	}
}

func TestResolveWorkload(t *testing.T) {
	var img imageConfig
	img.Config.Entrypoint = []string{"/entry"}
	img.Config.Cmd = []string{"default"}
	img.Config.Env = []string{"FOO=bar", "PATH=/bin"}
	img.Config.WorkingDir = "/app"
	w, err := resolveWorkload(img, &proto.Config{}, false)
	if err != nil || !reflect.DeepEqual(w.Args, []string{"/entry", "default"}) || w.Dir != "/app" || !reflect.DeepEqual(w.Env, []string{"FOO=bar", "PATH=/bin"}) {
		t.Fatalf("sealed: %+v, %v", w, err)
	}
	host := &proto.Config{Args: []string{"other"}, Env: []string{"FOO=baz", "NEW=1"}, Workdir: "/tmp"}
	if _, err := resolveWorkload(img, host, false); err != ErrOverridesRefused {
		t.Fatalf("overrides on a sealed config that forbids them: %v", err)
	}
	w, err = resolveWorkload(img, host, true)
	if err != nil || !reflect.DeepEqual(w.Args, []string{"/entry", "other"}) || w.Dir != "/tmp" ||
		!reflect.DeepEqual(w.Env, []string{"FOO=baz", "PATH=/bin", "NEW=1"}) {
		t.Fatalf("allowed overrides: %+v, %v", w, err)
	}
	if img.allowsOverrides() {
		t.Error("an image config without the label allows overrides")
	}
	var labelled imageConfig
	if err := json.Unmarshal([]byte(`{"config":{"Cmd":["x"],"Labels":{"`+sealed.LabelAllowOverrides+`":"true"}}}`), &labelled); err != nil || !labelled.allowsOverrides() {
		t.Errorf("the sealed label does not allow overrides: %v", err)
	}
	var empty imageConfig
	if _, err := resolveWorkload(empty, &proto.Config{}, false); err == nil {
		t.Fatal("nothing to run was accepted")
	}
	w, _ = resolveWorkload(imageConfig{Config: struct {
		User       string
		Env        []string
		Entrypoint []string
		Cmd        []string
		WorkingDir string
		Labels     map[string]string
	}{Cmd: []string{"x"}}}, &proto.Config{}, false)
	if w.Dir != "/" || !reflect.DeepEqual(w.Env, []string{defaultPath}) {
		t.Fatalf("defaults: %+v", w)
	}
}

func TestCredential(t *testing.T) {
	dir := t.TempDir()
	pw := filepath.Join(dir, "passwd")
	gr := filepath.Join(dir, "group")
	os.WriteFile(pw, []byte("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n# comment\n"), 0o644)
	os.WriteFile(gr, []byte("root:x:0:\napp:x:1001:\nwheel:x:10:app,other\naudio:x:29:other\n"), 0o644)
	for _, c := range []struct {
		user       string
		uid, gid   uint32
		groups     []uint32
		shouldFail bool
	}{
		{"app", 1000, 1001, []uint32{10}, false},
		{"1000", 1000, 1001, []uint32{10}, false},
		{"1000:29", 1000, 29, []uint32{10}, false},
		{"app:audio", 1000, 29, []uint32{10}, false},
		{"4242", 4242, 0, []uint32{}, false},
		{"4242:7", 4242, 7, []uint32{}, false},
		{"nobody", 0, 0, nil, true},
		{"app:nogroup", 0, 0, nil, true},
	} {
		cred, err := credential(c.user, pw, gr)
		if c.shouldFail {
			if err == nil {
				t.Errorf("%q: accepted", c.user)
			}
			continue
		}
		if err != nil || cred.Uid != c.uid || cred.Gid != c.gid || !reflect.DeepEqual(cred.Groups, c.groups) {
			t.Errorf("%q: %+v, %v; want %d:%d %v", c.user, cred, err, c.uid, c.gid, c.groups)
		}
	}
}

func TestScanPorts(t *testing.T) {
	dir := t.TempDir()
	for dev, name := range map[string]string{"vport1p1": "cwrun.control\n", "vport1p2": "cwrun.stdout\n", "vport1p3": ""} {
		os.MkdirAll(filepath.Join(dir, dev), 0o755)
		os.WriteFile(filepath.Join(dir, dev, "name"), []byte(name), 0o644)
	}
	got := scanPorts(dir)
	want := map[string]string{"cwrun.control": "/dev/vport1p1", "cwrun.stdout": "/dev/vport1p2"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestMergeEnvLookPath(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "tool"), []byte("#!"), 0o755)
	os.WriteFile(filepath.Join(dir, "data"), []byte("x"), 0o644)
	env := mergeEnv([]string{"PATH=/nonexistent:" + dir}, nil)
	if p, err := lookPath("tool", env); err != nil || p != filepath.Join(dir, "tool") {
		t.Fatalf("lookPath tool: %q %v", p, err)
	}
	if _, err := lookPath("data", env); err == nil {
		t.Fatal("a non-executable file was found")
	}
	if p, _ := lookPath("/abs/x", env); p != "/abs/x" {
		t.Fatalf("absolute path changed: %q", p)
	}
}
