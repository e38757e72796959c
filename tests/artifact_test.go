package tests

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/internal/testimage"
)

// layoutDisk takes disk.img out of the one image of an OCI layout with
// tar, reading the layout's JSON by hand.
func layoutDisk(t *testing.T, layout, dir string) []byte {
	t.Helper()
	type desc struct{ Digest string }
	var idx struct{ Manifests []desc }
	var m struct{ Layers []desc }
	read := func(p string, v any) {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
	}
	blob := func(d string) string {
		return filepath.Join(layout, "blobs", "sha256", strings.TrimPrefix(d, "sha256:"))
	}
	read(filepath.Join(layout, "index.json"), &idx)
	if len(idx.Manifests) != 1 {
		t.Fatalf("layout %s holds %d images", layout, len(idx.Manifests))
	}
	read(blob(idx.Manifests[0].Digest), &m)
	if len(m.Layers) != 1 {
		t.Fatalf("sealed image with %d layers", len(m.Layers))
	}
	mustRun(t, "tar", "-C", dir, "-xf", blob(m.Layers[0].Digest), "disk.img")
	b, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestArtifactPushPull seals an image, publishes its disk as an artifact
// referring to the source image on a registry without the referrers API
// (distribution 2.8: the sha256-<hex> tag schema), and pulls it back by
// the source image alone.
func TestArtifactPushPull(t *testing.T) {
	need(t, "skopeo", "mkfs.ext4", "tar")
	needRoot(t)
	reg := startRegistry(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	testimage.WriteLayout(t, src, "v1", testimage.Config{Cmd: []string{"/hello"}},
		testimage.Layer(t, E{Name: "hello", Mode: 0o755, Body: "hi"}))
	mustRun(t, "skopeo", "copy", "-q", "--dest-tls-verify=false", "oci:"+src+":v1", "docker://"+reg+"/app:v1")
	s := newStore(t)
	sealedLayout := filepath.Join(dir, "sealed")
	if r := s.cwrun(t, "--tls-verify=false", "build", "--tee", "sample", "--passphrase-file", writeKey(t, dir, "pw"),
		"docker://"+reg+"/app:v1", "oci:"+sealedLayout+":sealed"); r.code != 0 {
		t.Fatalf("cwrun build: exit %d\n%s", r.code, r.stderr)
	}
	disk := layoutDisk(t, sealedLayout, dir)

	// Without --artifact there is nothing push does.
	if r := s.cwrun(t, "push", "oci:"+sealedLayout+":sealed", reg+"/app:disk"); r.code == 0 || !strings.Contains(r.stderr, "--artifact") {
		t.Errorf("push without --artifact: exit %d, %q", r.code, r.stderr)
	}
	r := s.cwrun(t, "--tls-verify=false", "push", "--artifact", "--subject", reg+"/app:v1", "oci:"+sealedLayout+":sealed", reg+"/app:disk")
	if r.code != 0 {
		t.Fatalf("cwrun push --artifact: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("cwrun push --artifact:\n%s", r.stdout)
	if !strings.Contains(r.stdout, "no referrers API: tag sha256-") {
		t.Errorf("push output does not say the fallback tag was written:\n%s", r.stdout)
	}
	// The artifact, as another tool sees it.
	raw := mustRun(t, "skopeo", "inspect", "--raw", "--tls-verify=false", "docker://"+reg+"/app:disk")
	for _, want := range []string{`"artifactType":"application/vnd.cwrun.sealed-disk.v1"`, `"subject":`, `"application/vnd.oci.empty.v1+json"`, `"disk.img.zst"`} {
		if !strings.Contains(raw, want) {
			t.Errorf("artifact manifest lacks %s:\n%s", want, raw)
		}
	}

	cache := filepath.Join(dir, "cache")
	pull := func() result {
		return s.cwrun(t, "--tls-verify=false", "pull", "--cache-dir", cache, "--referrer-of", reg+"/app:v1")
	}
	r = pull()
	if r.code != 0 {
		t.Fatalf("cwrun pull --referrer-of: exit %d\n%s", r.code, r.stderr)
	}
	t.Logf("cwrun pull --referrer-of:\n%s%s", r.stdout, r.stderr)
	if !strings.Contains(r.stderr, "cwrun: pulling") {
		t.Errorf("the first pull shows no download:\n%s", r.stderr)
	}
	var path string
	for _, l := range strings.Split(r.stdout, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "disk" {
			path = f[1]
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("pull output %q: %v", r.stdout, err)
	}
	if !bytes.Equal(got, disk) {
		t.Fatalf("pulled disk (%d bytes) differs from the sealed image's disk.img (%d bytes)", len(got), len(disk))
	}
	if !strings.Contains(r.stdout, "format  raw") {
		t.Errorf("pull output: %s", r.stdout)
	}
	// Again: from the cache, no download.
	r = pull()
	if r.code != 0 || strings.Contains(r.stderr, "cwrun: pulling") || !strings.Contains(r.stdout, path) {
		t.Errorf("second pull: exit %d, stdout %q, stderr %q: want the cached disk and no download", r.code, r.stdout, r.stderr)
	}
}

func TestArtifactPullUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := store{root: t.TempDir(), runRoot: t.TempDir()}
	r := s.cwrun(t, "--tls-verify=false", "pull", "--cache-dir", t.TempDir(), addr+"/disks:v1")
	if r.code == 0 || !strings.Contains(r.stderr, "registry unreachable: "+addr) {
		t.Fatalf("exit %d, stderr %q: want a failure naming the registry", r.code, r.stderr)
	}
}
