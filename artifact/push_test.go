package artifact

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/internal/testimage"
	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/crypto/bcrypt"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// writeSealed writes a stand-in for a sealed image (one layer with
// /disk.img and /krun-sev.json) as an OCI layout, and returns its reference.
func writeSealed(t *testing.T, disk []byte) string {
	t.Helper()
	dir := t.TempDir()
	testimage.WriteLayout(t, dir, "sealed", testimage.Config{Entrypoint: []string{"/entrypoint"}},
		testimage.Layer(t,
			testimage.Entry{Name: "disk.img", Mode: 0o600, Body: string(disk)},
			testimage.Entry{Name: "krun-sev.json", Mode: 0o600, Body: `{"tee":"sample"}`}))
	return "oci:" + dir + ":sealed"
}

// referrersTagIndex reads the fallback tag index of subject, if any.
func referrersTagIndex(t *testing.T, r *reg, name string, subject digest.Digest) (imgspecv1.Index, bool) {
	t.Helper()
	_, rc, err := repo(t, r, name).FetchReference(context.Background(), "sha256-"+subject.Encoded())
	if err != nil {
		return imgspecv1.Index{}, false
	}
	defer rc.Close()
	var idx imgspecv1.Index
	b, _ := io.ReadAll(rc)
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatalf("the referrers tag index: %v\n%s", err, b)
	}
	return idx, true
}

func TestPushPullReferrers(t *testing.T) {
	bothRegistries(t, func(t *testing.T, r *reg) {
		ctx := context.Background()
		subject := putImage(t, repo(t, r, "app"), "v1", true, testimage.Layer(t, testimage.Entry{Name: "hello", Body: "hi"}))
		sys := testSys(t)
		sess := images.NewSession(images.Options{System: sys})
		defer sess.Close()
		t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

		disk1 := rawDisk(t, 3<<20, 10)
		res, err := PushSealed(ctx, sess, writeSealed(t, disk1), r.addr+"/app:v1-disk", PushOptions{Subject: r.addr + "/app:v1", Created: t0})
		if err != nil {
			t.Fatal(err)
		}
		if res.Subject.Digest != subject.Digest || res.DiskSize != int64(len(disk1)) {
			t.Errorf("pushed %+v; want subject %s, disk size %d", res, subject.Digest, len(disk1))
		}
		if want := r.kind == "ggcr"; res.ReferrersAPI != want {
			t.Errorf("ReferrersAPI %v on %s, want %v", res.ReferrersAPI, r.kind, want)
		}
		idx, ok := referrersTagIndex(t, r, "app", subject.Digest)
		switch {
		case r.kind == "distribution" && (!ok || len(idx.Manifests) != 1 || idx.Manifests[0].Digest != res.Digest):
			t.Fatalf("distribution: the fallback tag index is %v %+v; want it to list %s", ok, idx, res.Digest)
		case r.kind == "ggcr" && ok:
			t.Errorf("a registry with the referrers API got a fallback tag index too: %+v", idx)
		}

		opts := testOpts(t)
		opts.System = sys
		opts.ReferrerOf = r.addr + "/app:v1"
		d, err := Pull(ctx, "", opts)
		if err != nil {
			t.Fatal(err)
		}
		if d.Digest != res.Layer.Digest || d.Format != "raw" {
			t.Errorf("pulled %+v; want layer %s, raw", d, res.Layer.Digest)
		}
		sameFile(t, d.Path, disk1)

		// A newer disk for the same source: the index keeps both, and
		// the referrer lookup takes the newer.
		disk2 := rawDisk(t, 2<<20, 11)
		res2, err := PushSealed(ctx, sess, writeSealed(t, disk2), "docker://"+r.addr+"/app", PushOptions{Subject: r.addr + "/app:v1", Created: t0.Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		if r.kind == "distribution" {
			idx, _ := referrersTagIndex(t, r, "app", subject.Digest)
			var got []digest.Digest
			for _, m := range idx.Manifests {
				got = append(got, m.Digest)
			}
			if len(got) != 2 || !strings.Contains(fmtDigests(got), res.Digest.String()) || !strings.Contains(fmtDigests(got), res2.Digest.String()) {
				t.Errorf("after the second push the index lists %v; want %s and %s", got, res.Digest, res2.Digest)
			}
		}
		before := r.blobGets.Load()
		d2, err := Pull(ctx, "", opts)
		if err != nil {
			t.Fatal(err)
		}
		if d2.Digest != res2.Layer.Digest {
			t.Errorf("pulled %s; want the newer disk %s", d2.Digest, res2.Layer.Digest)
		}
		sameFile(t, d2.Path, disk2)
		if r.blobGets.Load() == before {
			t.Error("the newer disk was not downloaded: counter broken?")
		}
		// Again: from the cache.
		before = r.blobGets.Load()
		if _, err := Pull(ctx, "", opts); err != nil {
			t.Fatal(err)
		}
		if n := r.blobGets.Load() - before; n != 0 {
			t.Errorf("a cached referrer downloaded %d blobs", n)
		}

		// The artifact by its own tag is an artifact like any other.
		d3, err := Pull(ctx, "docker://"+r.addr+"/app:v1-disk", opts0(opts))
		if err != nil || d3.Digest != res.Layer.Digest {
			t.Errorf("pull by tag: %+v, %v", d3, err)
		}

		opts.ArtifactType = "application/vnd.example.other"
		_, err = Pull(ctx, "", opts)
		t.Log(err)
		if !errors.Is(err, ErrNoReferrer) || !strings.Contains(err.Error(), ArtifactTypeSealedDisk) {
			t.Errorf("err %v; want ErrNoReferrer listing the sealed disks there are", err)
		}
	})
}

// opts0 drops the referrer lookup from opts.
func opts0(o PullOptions) PullOptions {
	o.ReferrerOf, o.ArtifactType = "", ""
	return o
}

func fmtDigests(ds []digest.Digest) string {
	var s []string
	for _, d := range ds {
		s = append(s, d.String())
	}
	return strings.Join(s, " ")
}

func TestPushRefusals(t *testing.T) {
	r := startGGCR(t)
	ctx := context.Background()
	putImage(t, repo(t, r, "app"), "v1", true, testimage.Layer(t, testimage.Entry{Name: "hello", Body: "hi"}))
	sess := images.NewSession(images.Options{System: testSys(t)})
	defer sess.Close()
	sealedRef := writeSealed(t, rawDisk(t, 1<<16, 1))
	for _, c := range []struct {
		name, sealed, dest, subject, want string
	}{
		{"no subject", sealedRef, r.addr + "/app:d", "", "--subject"},
		{"other repository", sealedRef, r.addr + "/elsewhere:d", r.addr + "/app:v1", "repository of its subject"},
		{"subject missing", sealedRef, r.addr + "/app:d", r.addr + "/app:nope", "app:nope"},
		{"not sealed", writeNotSealed(t), r.addr + "/app:d", r.addr + "/app:v1", "not a sealed image"},
		{"digest destination", sealedRef, r.addr + "/app@" + digest.FromString("x").String(), r.addr + "/app:v1", "names a digest"},
	} {
		_, err := PushSealed(ctx, sess, c.sealed, c.dest, PushOptions{Subject: c.subject})
		t.Logf("%s: %v", c.name, err)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one saying %q", c.name, err, c.want)
		}
	}
}

func writeNotSealed(t *testing.T) string {
	dir := t.TempDir()
	testimage.WriteLayout(t, dir, "x", testimage.Config{}, testimage.Layer(t, testimage.Entry{Name: "hello", Body: "hi"}))
	return "oci:" + dir + ":x"
}

func TestSubjectName(t *testing.T) {
	d := digest.FromString("src")
	n, err := subjectName(map[string]string{AnnotationBaseName: "reg.example/app:v1", AnnotationBaseDigest: d.String()}, "", "x")
	if err != nil || n.String() != "reg.example/app@"+d.String() {
		t.Errorf("from annotations: %v, %v", n, err)
	}
	n, err = subjectName(map[string]string{AnnotationBaseName: "reg.example/app:v1"}, "other.example/app:v2", "x")
	if err != nil || n.String() != "other.example/app:v2" {
		t.Errorf("--subject wins: %v, %v", n, err)
	}
	if _, err := subjectName(nil, "", "x"); err == nil {
		t.Error("no subject anywhere: no error")
	}
}

// TestRegistryAuth: credentials come from auth.json, for c/image's
// reads and for oras' referrers and pushes alike.
func TestRegistryAuth(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(dir, "htpasswd")
	os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600)
	r := startDistributionWith(t, fmt.Sprintf("auth:\n  htpasswd:\n    realm: test\n    path: %s\n", htpasswd))
	rp := repo(t, r, "app")
	rp.Client = &auth.Client{Credential: auth.StaticCredential(r.addr, auth.Credential{Username: "alice", Password: "s3cret"})}
	subject := putImage(t, rp, "v1", true, testimage.Layer(t, testimage.Entry{Name: "hello", Body: "hi"}))

	sys := testSys(t)
	sess := images.NewSession(images.Options{System: sys})
	defer sess.Close()
	disk := rawDisk(t, 1<<20, 12)
	// Without credentials: refused, and said so.
	_, err = PushSealed(ctx, sess, writeSealed(t, disk), r.addr+"/app:disk", PushOptions{Subject: r.addr + "/app:v1"})
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "podman login") {
		t.Fatalf("push without credentials: %v", err)
	}

	authJSON := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, r.addr, base64.StdEncoding.EncodeToString([]byte("alice:s3cret")))
	if err := os.WriteFile(sys.AuthFilePath, []byte(authJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	res, err := PushSealed(ctx, sess, writeSealed(t, disk), r.addr+"/app:disk", PushOptions{Subject: r.addr + "/app:v1"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Subject.Digest != subject.Digest || res.ReferrersAPI {
		t.Errorf("pushed %+v", res)
	}
	opts := testOpts(t)
	opts.System = sys
	opts.ReferrerOf = r.addr + "/app:v1"
	d, err := Pull(ctx, "", opts)
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, d.Path, disk)
}

// --referrer-of goes through registries.conf's mirrors, as a pull does:
// an edge box that reaches only a mirror finds the disk there, and a
// mirror without the referrer leaves the lookup to the registry.
func TestReferrerThroughMirror(t *testing.T) {
	ctx := context.Background()
	layer := testimage.Layer(t, testimage.Entry{Name: "hello", Body: "hi"})
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	withMirror := func(t *testing.T, registry, mirror string) PullOptions {
		opts := testOpts(t)
		conf := filepath.Join(t.TempDir(), "registries.conf")
		body := fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n[[registry.mirror]]\nlocation = %q\ninsecure = true\n", registry, mirror)
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		opts.System.SystemRegistriesConfPath = conf
		return opts
	}
	push := func(t *testing.T, r *reg, disk []byte) *PushResult {
		t.Helper()
		sess := images.NewSession(images.Options{System: testSys(t)})
		defer sess.Close()
		res, err := PushSealed(ctx, sess, writeSealed(t, disk), r.addr+"/app:v1-disk", PushOptions{Subject: r.addr + "/app:v1", Created: t0})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}

	// pulls checks that opts's referrer lookup pulls the disk res pushed.
	pulls := func(t *testing.T, opts PullOptions, res *PushResult, disk []byte) {
		t.Helper()
		d, err := Pull(ctx, "", opts)
		if err != nil {
			t.Fatal(err)
		}
		if d.Digest != res.Layer.Digest {
			t.Errorf("pulled %s; want %s", d.Digest, res.Layer.Digest)
		}
		sameFile(t, d.Path, disk)
	}

	t.Run("only the mirror answers", func(t *testing.T) {
		mirror := startGGCR(t)
		putImage(t, repo(t, mirror, "app"), "v1", true, layer)
		disk := rawDisk(t, 1<<20, 20)
		res := push(t, mirror, disk)
		// Nothing listens on port 1: the registry itself is out of reach.
		opts := withMirror(t, "127.0.0.1:1", mirror.addr)
		opts.ReferrerOf = "127.0.0.1:1/app:v1"
		pulls(t, opts, res, disk)
	})

	t.Run("the mirror lacks the referrer", func(t *testing.T) {
		mirror, primary := startGGCR(t), startDistribution(t)
		putImage(t, repo(t, mirror, "app"), "v1", true, layer)
		putImage(t, repo(t, primary, "app"), "v1", true, layer)
		disk := rawDisk(t, 1<<20, 21)
		res := push(t, primary, disk)
		opts := withMirror(t, primary.addr, mirror.addr)
		opts.ReferrerOf = primary.addr + "/app:v1"
		pulls(t, opts, res, disk)

		// Neither has a referrer of this type: the error names both.
		opts.ArtifactType = "application/vnd.example.other"
		_, err := Pull(ctx, "", opts)
		t.Log(err)
		if !errors.Is(err, ErrNoReferrer) || !strings.Contains(err.Error(), "mirror "+mirror.addr) || !strings.Contains(err.Error(), "registry "+primary.addr) {
			t.Errorf("err %v; want ErrNoReferrer naming the mirror and the registry", err)
		}
	})
}
