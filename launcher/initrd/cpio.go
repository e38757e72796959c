package initrd

import (
	"fmt"
	"io"
)

// cpioWriter writes the "newc" cpio format (070701) the kernel unpacks
// into its initramfs. Every header field that could vary between builds
// is fixed: inode numbers count up from 1 in write order, mtime, uid,
// gid and device numbers are 0, so the same entries in the same order
// give the same bytes.
type cpioWriter struct {
	w     io.Writer
	n     int64 // bytes written, for the 4-byte alignment
	inode uint32
	err   error
}

func newCPIOWriter(w io.Writer) *cpioWriter { return &cpioWriter{w: w} }

// File modes (the S_IF* bits of st_mode).
const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

// Dir adds a folder.
func (c *cpioWriter) Dir(name string, perm uint32) error {
	return c.entry(name, modeDir|perm, 0, 0, nil)
}

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) error {
	return c.entry(name, modeFile|perm, 0, 0, data)
}

// FileFrom adds a regular file of size bytes read from r, so that a
// large file need not be held in memory.
func (c *cpioWriter) FileFrom(name string, perm uint32, size int64, r io.Reader) error {
	if c.err != nil {
		return c.err
	}
	c.inode++
	c.header(name, c.inode, modeFile|perm, 0, 0, size)
	if c.err != nil {
		return c.err
	}
	n, err := io.CopyN(c.w, r, size)
	c.n += n
	if err != nil {
		c.err = fmt.Errorf("copying %s into the cpio: %w (did it change while being read?)", name, err)
		return c.err
	}
	c.pad()
	return c.err
}

// Symlink adds a symbolic link to target.
func (c *cpioWriter) Symlink(name, target string) error {
	return c.entry(name, modeLink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node (no root needed: it is bytes).
func (c *cpioWriter) CharDev(name string, perm uint32, major, minor uint32) error {
	return c.entry(name, modeChr|perm, major, minor, nil)
}

// Close writes the trailer.
func (c *cpioWriter) Close() error {
	c.inode = 0 // the trailer has inode 0, as GNU cpio writes it
	return c.write("TRAILER!!!", 0, 0, 0, 0, nil)
}

func (c *cpioWriter) entry(name string, mode, rmajor, rminor uint32, data []byte) error {
	c.inode++
	return c.write(name, c.inode, mode, rmajor, rminor, data)
}

func (c *cpioWriter) write(name string, ino, mode, rmajor, rminor uint32, data []byte) error {
	if c.err != nil {
		return c.err
	}
	c.header(name, ino, mode, rmajor, rminor, int64(len(data)))
	c.put(data)
	c.pad()
	return c.err
}

func (c *cpioWriter) header(name string, ino, mode, rmajor, rminor uint32, size int64) {
	if size > 0xffffffff {
		c.err = fmt.Errorf("%s: %d bytes, more than a newc cpio entry holds", name, size)
		return
	}
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	c.put([]byte(hdr))
	c.put([]byte(name))
	c.put([]byte{0})
	c.pad()
}

func (c *cpioWriter) put(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.put(make([]byte, 4-r))
	}
}
