package luks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
)

// chunkSize is how much one worker reads, encrypts and writes at a time:
// large enough that syscalls are cheap next to AES, small enough that
// workers share the tail of the payload evenly.
const chunkSize = 1 << 20

var errWiped = errors.New("luks: volume was wiped; open it again")

func (v *Volume) checkRange(what string, off, n int64) error {
	if v.xts == nil {
		return errWiped
	}
	ss := int64(v.info.SectorSize)
	if off < 0 || off%ss != 0 || n%ss != 0 {
		return fmt.Errorf("luks: %s: offset %d and length %d must be non-negative multiples of the %d-byte sector size", what, off, n, ss)
	}
	return nil
}

// DecryptSectors decrypts buf in place. buf holds whole encryption sectors
// starting at payloadOff bytes into the payload; both must be multiples of
// the sector size.
func (v *Volume) DecryptSectors(buf []byte, payloadOff int64) error {
	if err := v.checkRange("decrypt", payloadOff, int64(len(buf))); err != nil {
		return err
	}
	v.xts.cryptSectors(buf, payloadOff, v.info.SectorSize, false)
	return nil
}

// EncryptSectors encrypts buf in place, the inverse of DecryptSectors.
func (v *Volume) EncryptSectors(buf []byte, payloadOff int64) error {
	if err := v.checkRange("encrypt", payloadOff, int64(len(buf))); err != nil {
		return err
	}
	v.xts.cryptSectors(buf, payloadOff, v.info.SectorSize, true)
	return nil
}

// EncryptFile encrypts in place the payload bytes [0, size) that lie in f
// at [off, off+size), off being the file offset of payload byte 0
// (normally PayloadOffset()). size must be a multiple of the sector size.
// workers goroutines (0 means runtime.NumCPU()) each read, encrypt and
// write 1 MiB chunks. On error or cancellation part of the payload is
// encrypted and part is not: the file is garbage and must be rebuilt.
func (v *Volume) EncryptFile(ctx context.Context, f *os.File, off, size int64, workers int) error {
	if err := v.checkRange("encrypt file", 0, size); err != nil {
		return err
	}
	if off < 0 {
		return fmt.Errorf("luks: encrypt %s: negative file offset %d", f.Name(), off)
	}
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	chunks := (size + chunkSize - 1) / chunkSize
	workers = int(min(int64(workers), max(chunks, 1)))
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			buf := make([]byte, chunkSize)
			for {
				if ctx.Err() != nil {
					return
				}
				i := next.Add(1) - 1
				if i >= chunks {
					return
				}
				pos := i * chunkSize
				b := buf[:min(chunkSize, size-pos)]
				if _, err := f.ReadAt(b, off+pos); err != nil {
					cancel(fmt.Errorf("luks: encrypt %s: reading payload at file offset %d: %w", f.Name(), off+pos, err))
					return
				}
				v.xts.cryptSectors(b, pos, v.info.SectorSize, true)
				if _, err := f.WriteAt(b, off+pos); err != nil {
					cancel(fmt.Errorf("luks: encrypt %s: writing payload at file offset %d: %w", f.Name(), off+pos, err))
					return
				}
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("luks: encrypt %s: %w; the payload is partly encrypted, rebuild the disk", f.Name(), err)
		}
		return err
	}
	return nil
}

// PayloadReader returns a plaintext view of the payload of disk, the whole
// device (header included): ReadAt(p, 0) reads payload byte 0. Reads past a
// fixed LUKS2 payload size end with io.EOF. It works on a Volume that is
// not wiped afterwards.
func (v *Volume) PayloadReader(disk io.ReaderAt) io.ReaderAt {
	return &payloadReader{v: v, disk: disk}
}

type payloadReader struct {
	v    *Volume
	disk io.ReaderAt
}

func (p *payloadReader) ReadAt(b []byte, off int64) (int, error) {
	if p.v.xts == nil {
		return 0, errWiped
	}
	if off < 0 {
		return 0, fmt.Errorf("luks: payload read at negative offset %d", off)
	}
	var eof error
	if size := p.v.info.PayloadSize; size > 0 {
		if off >= size {
			return 0, io.EOF
		}
		if rest := size - off; int64(len(b)) > rest {
			b = b[:rest]
			eof = io.EOF
		}
	}
	ss := int64(p.v.info.SectorSize)
	n := 0
	buf := make([]byte, min(roundUp(int64(len(b))+ss, ss), chunkSize+ss))
	for n < len(b) {
		pos := off + int64(n)
		start := pos / ss * ss
		want := roundUp(pos+int64(len(b)-n), ss) - start
		chunk := buf[:min(want, int64(len(buf)))]
		got, err := p.disk.ReadAt(chunk, p.v.info.PayloadOffset+start)
		got -= got % int(ss)
		if got > 0 {
			p.v.xts.cryptSectors(chunk[:got], start, int(ss), false)
			n += copy(b[n:], chunk[pos-start:got])
		}
		if n < len(b) && (err != nil || got <= int(pos-start)) {
			clear(buf)
			if err == nil || errors.Is(err, io.EOF) {
				return n, io.EOF
			}
			return n, fmt.Errorf("luks: reading encrypted payload at %d: %w", p.v.info.PayloadOffset+start, err)
		}
	}
	clear(buf)
	return n, eof
}
