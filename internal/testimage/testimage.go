// Package testimage writes small OCI images for tests: an OCI layout
// folder made from layer tars the test declares entry by entry, so that
// what an image holds is stated by the test and not computed by the
// code under test.
package testimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Entry is one tar entry of a layer.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg when zero
	Mode     int64
	UID, GID int
	Body     string
	Link     string // symlink or hard link target
	Major    int64
	Minor    int64
	Xattrs   map[string]string
}

// Layer encodes entries as an uncompressed tar.
func Layer(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		typ := e.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.Mode
		if mode == 0 {
			mode = 0o644
			if typ == tar.TypeDir {
				mode = 0o755
			}
		}
		h := &tar.Header{
			Name: e.Name, Typeflag: typ, Mode: mode, Uid: e.UID, Gid: e.GID,
			Linkname: e.Link, Devmajor: e.Major, Devminor: e.Minor,
			ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX,
		}
		if typ == tar.TypeReg {
			h.Size = int64(len(e.Body))
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("layer entry %s: %v", e.Name, err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write([]byte(e.Body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Config is the part of an image config tests set.
type Config struct {
	Entrypoint, Cmd, Env []string
	WorkingDir, User     string
}

// WriteLayout writes an OCI layout at dir with one image tagged tag.
// Reference it as "oci:DIR:TAG".
func WriteLayout(t testing.TB, dir, tag string, cfg Config, layers ...[]byte) {
	t.Helper()
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	put := func(b []byte) string {
		sum := sha256.Sum256(b)
		h := hex.EncodeToString(sum[:])
		if err := os.WriteFile(filepath.Join(blobs, h), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return "sha256:" + h
	}
	type desc struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
	}
	var layerDescs []desc
	var diffIDs []string
	for _, l := range layers {
		d := put(l)
		layerDescs = append(layerDescs, desc{"application/vnd.oci.image.layer.v1.tar", d, len(l), nil})
		diffIDs = append(diffIDs, d)
	}
	config, err := json.Marshal(map[string]any{
		"created": "2025-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
		"config": map[string]any{
			"Entrypoint": cfg.Entrypoint, "Cmd": cfg.Cmd, "Env": cfg.Env,
			"WorkingDir": cfg.WorkingDir, "User": cfg.User,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	if err != nil {
		t.Fatal(err)
	}
	cd := put(config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": desc{"application/vnd.oci.image.config.v1+json", cd, len(config), nil},
		"layers": layerDescs,
	})
	if err != nil {
		t.Fatal(err)
	}
	md := put(manifest)
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []desc{{"application/vnd.oci.image.manifest.v1+json", md, len(manifest),
			map[string]string{"org.opencontainers.image.ref.name": tag}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "index.json"), index, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
}
