package build

import (
	"bytes"
	"io"
	"testing"

	"github.com/cwrun/cwrun/sealed"
)

func TestTailBufferKeepsHeadAndTail(t *testing.T) {
	disk := make([]byte, 100000)
	for i := range disk {
		disk[i] = byte(i * 7)
	}
	cfg := []byte(`{"tee":"snp","workload_id":"w"}`)
	disk = append(disk, sealed.Footer(int64(len(disk)), cfg)...)
	head := disk[:1000]
	tb := newTailBuffer(5000)
	// Written in uneven pieces, as io.Copy would.
	for rest := disk[1000:]; len(rest) > 0; {
		n := min(len(rest), 777)
		tb.Write(rest[:n])
		rest = rest[n:]
	}
	r := tb.readerAt(head, int64(len(disk)))
	got, _, err := sealed.ReadFooter(r, int64(len(disk)))
	if err != nil || !bytes.Equal(got, cfg) {
		t.Fatalf("footer %q, %v", got, err)
	}
	b := make([]byte, 10)
	if _, err := r.ReadAt(b, 50000); err == nil || err == io.EOF {
		t.Fatalf("a read of the dropped middle returned %v, want an error", err)
	}
	if _, err := r.ReadAt(b, 5); err != nil || !bytes.Equal(b, disk[5:15]) {
		t.Fatalf("head read: %v", err)
	}
}
