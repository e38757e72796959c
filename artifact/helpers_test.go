package artifact

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/ulikunitz/xz"
	"go.podman.io/image/v5/types"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
)

// reg is a registry on loopback behind a handler that counts blob
// downloads and can corrupt chosen blobs on their way out.
type reg struct {
	addr     string
	kind     string // "ggcr" (referrers API) or "distribution" (none)
	blobGets atomic.Int64
	mu       sync.Mutex
	faults   map[string]string // blob digest -> "flip" | "truncate"
}

func (r *reg) fault(d digest.Digest, mode string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.faults[d.String()] = mode
}

func (r *reg) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodGet || !strings.Contains(req.URL.Path, "/blobs/") {
			h.ServeHTTP(w, req)
			return
		}
		r.blobGets.Add(1)
		r.mu.Lock()
		mode := r.faults[path.Base(req.URL.Path)]
		r.mu.Unlock()
		if mode == "" {
			h.ServeHTTP(w, req)
			return
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		body := rec.Body.Bytes()
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(rec.Code)
		switch mode {
		case "flip":
			body = bytes.Clone(body)
			body[len(body)/2] ^= 0xff
			w.Write(body)
		case "truncate":
			// Declare the whole length, send half: the server then
			// drops the connection, as a broken network would.
			w.Write(body[:len(body)/2])
		}
	})
}

// startGGCR serves go-containerregistry's registry (with the referrers
// API) over plain HTTP on loopback.
func startGGCR(t *testing.T) *reg {
	t.Helper()
	r := &reg{kind: "ggcr", faults: map[string]string{}}
	h := registry.New(registry.WithReferrersSupport(true), registry.Logger(log.New(io.Discard, "", 0)))
	s := httptest.NewServer(r.wrap(h))
	t.Cleanup(s.Close)
	r.addr = strings.TrimPrefix(s.URL, "http://")
	return r
}

// startDistribution runs Debian's docker-registry (distribution 2.8, no
// referrers API) on loopback, behind the same counting handler.
func startDistribution(t *testing.T) *reg { return startDistributionWith(t, "") }

// startDistributionWith adds extra YAML (top-level keys) to the
// registry's configuration.
func startDistributionWith(t *testing.T, extra string) *reg {
	t.Helper()
	if _, err := exec.LookPath("docker-registry"); err != nil {
		t.Skip("docker-registry not installed (make deps installs it)")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n%s", filepath.Join(dir, "data"), addr, extra)), 0o644)
	cmd := exec.Command("docker-registry", "serve", cfg)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not listen on %s", addr)
		}
	}
	u, _ := url.Parse("http://" + addr)
	r := &reg{kind: "distribution", faults: map[string]string{}}
	s := httptest.NewServer(r.wrap(httputil.NewSingleHostReverseProxy(u)))
	t.Cleanup(s.Close)
	r.addr = strings.TrimPrefix(s.URL, "http://")
	return r
}

func bothRegistries(t *testing.T, f func(t *testing.T, r *reg)) {
	t.Run("ggcr", func(t *testing.T) { f(t, startGGCR(t)) })
	t.Run("distribution", func(t *testing.T) { f(t, startDistribution(t)) })
}

// testSys is a system context that reads nothing of the machine's
// configuration: an empty registries.conf and auth.json, a policy that
// accepts anything, TLS verification off (the registries speak HTTP).
func testSys(t *testing.T) *types.SystemContext {
	t.Helper()
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	empty := filepath.Join(dir, "empty.d")
	os.Mkdir(empty, 0o755)
	return &types.SystemContext{
		SystemRegistriesConfPath:    write("registries.conf", ""),
		SystemRegistriesConfDirPath: empty,
		RegistriesDirPath:           empty,
		DockerPerHostCertDirPath:    empty,
		AuthFilePath:                write("auth.json", "{}"),
		SignaturePolicyPath:         write("policy.json", `{"default":[{"type":"insecureAcceptAnything"}]}`),
		DockerInsecureSkipTLSVerify: types.OptionalBoolTrue,
		OSChoice:                    "linux",
		ArchitectureChoice:          "amd64",
	}
}

func testOpts(t *testing.T) PullOptions {
	return PullOptions{CacheDir: t.TempDir(), System: testSys(t)}
}

// rawDisk is a synthetic raw disk: random 64 KiB blocks among zeros.
func rawDisk(t *testing.T, size int, seed uint64) []byte {
	t.Helper()
	b := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 1))
	for off := 0; off < size; off += 256 << 10 {
		for i := off; i < min(off+64<<10, size); i++ {
			b[i] = byte(rng.Uint32())
		}
	}
	return b
}

// qcow2Of converts a raw disk with qemu-img.
func qcow2Of(t *testing.T, raw []byte) []byte {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (Debian's qemu-utils)")
	}
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.raw"), filepath.Join(dir, "out.qcow2")
	if err := os.WriteFile(in, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", in, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("QFI\xfb")) {
		t.Fatal("qemu-img wrote no qcow2 magic")
	}
	return b
}

func zstdOf(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := zstd.NewWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	w.Close()
	return out.Bytes()
}

func xzOf(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := xz.NewWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	w.Close()
	return out.Bytes()
}

func gzipOf(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w := gzip.NewWriter(&out)
	w.Write(b)
	w.Close()
	return out.Bytes()
}

// repo is an oras client for a test registry, used to publish fixtures
// independently of the code under test.
func repo(t *testing.T, r *reg, name string) *remote.Repository {
	t.Helper()
	rp, err := remote.NewRepository(r.addr + "/" + name)
	if err != nil {
		t.Fatal(err)
	}
	rp.PlainHTTP = true
	return rp
}

func putBlob(t *testing.T, rp *remote.Repository, mediaType string, b []byte, ann map[string]string) imgspecv1.Descriptor {
	t.Helper()
	d := content.NewDescriptorFromBytes(mediaType, b)
	d.Annotations = ann
	if err := rp.Push(context.Background(), d, bytes.NewReader(b)); err != nil {
		t.Fatalf("pushing blob %s: %v", d.Digest, err)
	}
	return d
}

// putManifest pushes a manifest or index, tagged when tag is set.
func putManifest(t *testing.T, rp *remote.Repository, mediaType string, v any, tag string) imgspecv1.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	d := content.NewDescriptorFromBytes(mediaType, b)
	ctx := context.Background()
	if tag != "" {
		err = rp.PushReference(ctx, d, bytes.NewReader(b), tag)
	} else {
		err = rp.Push(ctx, d, bytes.NewReader(b))
	}
	if err != nil {
		t.Fatalf("pushing manifest: %v", err)
	}
	return d
}

// putArtifact publishes an OCI artifact with one disk layer.
func putArtifact(t *testing.T, rp *remote.Repository, tag, mediaType string, layer []byte, ann map[string]string) (manifest, layerDesc imgspecv1.Descriptor) {
	t.Helper()
	cfg := putBlob(t, rp, imgspecv1.MediaTypeEmptyJSON, []byte("{}"), nil)
	l := putBlob(t, rp, mediaType, layer, ann)
	m := imgspecv1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: imgspecv1.MediaTypeImageManifest,
		ArtifactType: "application/vnd.example.disk", Config: cfg, Layers: []imgspecv1.Descriptor{l},
	}
	return putManifest(t, rp, imgspecv1.MediaTypeImageManifest, m, tag), l
}

// putImage publishes an ordinary container image with the given tar
// layers (gzip-compressed when gz).
func putImage(t *testing.T, rp *remote.Repository, tag string, gz bool, layers ...[]byte) imgspecv1.Descriptor {
	t.Helper()
	var descs []imgspecv1.Descriptor
	var diffIDs []digest.Digest
	for _, l := range layers {
		diffIDs = append(diffIDs, digest.FromBytes(l))
		mt := imgspecv1.MediaTypeImageLayer
		if gz {
			l, mt = gzipOf(t, l), imgspecv1.MediaTypeImageLayerGzip
		}
		descs = append(descs, putBlob(t, rp, mt, l, nil))
	}
	cfg, _ := json.Marshal(imgspecv1.Image{
		Platform: imgspecv1.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   imgspecv1.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	c := putBlob(t, rp, imgspecv1.MediaTypeImageConfig, cfg, nil)
	m := imgspecv1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: imgspecv1.MediaTypeImageManifest, Config: c, Layers: descs}
	return putManifest(t, rp, imgspecv1.MediaTypeImageManifest, m, tag)
}

// sameFile fails unless the file at p holds exactly want.
func sameFile(t *testing.T, p string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %d bytes, sha256 %x; want %d bytes, sha256 %x", p, len(got), sha256.Sum256(got), len(want), sha256.Sum256(want))
	}
}

// cacheLeftovers lists files in the cache other than complete disks.
func cacheLeftovers(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(d.Name(), ".partial-") {
			out = append(out, p)
		}
		return nil
	})
	return out
}

func digestOf(b []byte) digest.Digest { return digest.FromBytes(b) }

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
