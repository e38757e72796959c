package luks

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"
)

// extractMkcwDisk returns disk.img from the one layer of an OCI archive.
func extractMkcwDisk(t testing.TB, archive string) []byte {
	t.Helper()
	blobs := map[string][]byte{}
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("reading %s: %v", archive, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		blobs[h.Name] = b
	}
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
	}
	blob := func(d desc) []byte {
		b, ok := blobs["blobs/"+strings.Replace(d.Digest, ":", "/", 1)]
		if !ok {
			t.Fatalf("%s: blob %s missing", archive, d.Digest)
		}
		return b
	}
	var index struct{ Manifests []desc }
	if err := json.Unmarshal(blobs["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("%s: index.json: %v, %d manifests", archive, err, len(index.Manifests))
	}
	var manifest struct{ Layers []desc }
	if err := json.Unmarshal(blob(index.Manifests[0]), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("%s: manifest: %v, %d layers", archive, err, len(manifest.Layers))
	}
	layer := manifest.Layers[0]
	var r io.Reader = bytes.NewReader(blob(layer))
	if strings.HasSuffix(layer.MediaType, "gzip") {
		if r, err = gzip.NewReader(r); err != nil {
			t.Fatal(err)
		}
	}
	lr := tar.NewReader(r)
	for {
		h, err := lr.Next()
		if err != nil {
			t.Fatalf("%s: no disk.img in the layer (%v)", archive, err)
		}
		if strings.TrimPrefix(h.Name, "./") == "disk.img" {
			b, err := io.ReadAll(lr)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
}
