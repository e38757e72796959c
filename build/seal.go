package build

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/build/luks"
	"github.com/cwrun/cwrun/build/rootfs"
	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/sealed"
	digest "github.com/opencontainers/go-digest"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// Options of a seal. The zero value of each field means its default.
type Options struct {
	TEE        sealed.TEE // default snp
	CPUs       int        // vCPUs the workload is measured for; default 2
	MemoryMiB  int        // RAM the workload is measured for; default 512
	WorkloadID string     // the broker's key for the disk; default 32 random bytes, hex
	// Passphrase unlocks the disk. Default: 32 random bytes, hex (64
	// characters), returned in Result.Passphrase. The caller wipes it.
	Passphrase     []byte
	AttestationURL string
	// Register, when set, hands the workload's config and passphrase to
	// a key broker before any disk is made, so that a broker refusal
	// fails the seal in a second and no image exists whose key nobody
	// holds. undo takes the registration back if the seal then fails.
	Register func(ctx context.Context, cfg sealed.Config, passphrase []byte) (undo func(context.Context) error, err error)
	Slop     *Slop     // default DefaultSlop (25%)
	AddFiles []AddFile // extra files copied into the root file system
	LUKS     int       // 1 or 2; default 2
	// AllowOverrides lets `cwrun run` replace the sealed command and
	// environment from the host. Default off.
	AllowOverrides bool
	TmpDir         string // where the work goes; default: RAM (/dev/shm) when it fits, else $TMPDIR or /var/tmp
	Mkfs           string // path of mkfs.ext4; default looked up
	Version        string // cwrun's version, recorded in the image
	// Progress receives the seal's stages; nil means silent.
	Progress func(Event)
	// Report receives c/image's copy progress lines; nil means silent.
	Report io.Writer
	Log    *slog.Logger // default discards
}

// AddFile copies the host file Src to Dst in the sealed root file system.
type AddFile struct{ Src, Dst string }

// ParseAddFile reads SRC:DST.
func ParseAddFile(s string) (AddFile, error) {
	src, dst, ok := strings.Cut(s, ":")
	if !ok || src == "" || dst == "" {
		return AddFile{}, fmt.Errorf("--add-file %q: want HOSTPATH:GUESTPATH", s)
	}
	if !path.IsAbs(dst) {
		return AddFile{}, fmt.Errorf("--add-file %q: the guest path must be absolute", s)
	}
	return AddFile{Src: src, Dst: dst}, nil
}

// Event reports progress: a stage starts (Done 0), advances, or ends.
type Event struct {
	Stage       string
	Done, Total int64 // bytes; Total 0 when unknown
	End         bool
}

// Result says what was sealed.
type Result struct {
	Destination    string
	ManifestDigest string
	WorkloadID     string
	Passphrase     []byte // set only when generated; the caller wipes it
	Registered     bool   // Options.Register took the passphrase
	Config         sealed.Config
	TreeSize       int64 // the flattened root file system's data
	PayloadSize    int64 // the ext4 file system
	DiskSize       int64 // disk.img: LUKS header + payload + footer
	LayerSize      int64
	Stages         []StageTime
}

// StageTime is how long one stage of the seal took.
type StageTime struct {
	Stage    string
	Duration time.Duration
}

func (o *Options) defaults() error {
	if o.TEE == "" {
		o.TEE = sealed.TEESNP
	}
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 512
	}
	if o.CPUs < 0 || o.MemoryMiB < 0 {
		return fmt.Errorf("--cpus %d / --memory %d: must be positive", o.CPUs, o.MemoryMiB)
	}
	if o.LUKS == 0 {
		o.LUKS = 2
	}
	if o.LUKS != 1 && o.LUKS != 2 {
		return fmt.Errorf("--luks %d: want 1 or 2", o.LUKS)
	}
	if o.Slop == nil {
		o.Slop = &DefaultSlop
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Progress == nil {
		o.Progress = func(Event) {}
	}
	return nil
}

func randomHex(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	out := make([]byte, hex.EncodedLen(n))
	hex.Encode(out, b)
	clear(b)
	return out
}

// Seal reads the image src, seals it and writes the result to dst. On
// any error, including ctx's cancellation, it leaves no work folder and
// no image at dst.
func Seal(ctx context.Context, sess *images.Session, src, dst string, opts Options) (res *Result, err error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	mkfsPath, err := mkfsProgram(opts.Mkfs)
	if err != nil {
		return nil, err
	}
	dstRef, err := sess.Destination(dst)
	if err != nil {
		return nil, err
	}
	res = &Result{Destination: images.Ref(dstRef), WorkloadID: opts.WorkloadID}
	if res.WorkloadID == "" {
		res.WorkloadID = string(randomHex(32))
	}
	pass := opts.Passphrase
	if len(pass) == 0 {
		pass = randomHex(32)
		res.Passphrase = pass
	}
	defer func() {
		if err != nil && res != nil {
			clear(res.Passphrase)
			res = nil
		}
	}()
	stage := stageClock(res, opts.Progress)

	// 0. The broker learns the key first (see Options.Register).
	res.Config = sealed.Config{
		TEE: opts.TEE, TEEData: sealed.DefaultTEEData(opts.TEE), WorkloadID: res.WorkloadID,
		CPUs: opts.CPUs, RAMMiB: opts.MemoryMiB, AttestationURL: opts.AttestationURL,
		Cwrun: &sealed.CwrunConfig{Version: opts.Version, LUKS: opts.LUKS, AllowOverrides: opts.AllowOverrides},
	}
	if opts.Register != nil {
		stage("register", 0)
		undo, rerr := opts.Register(ctx, res.Config, pass)
		if rerr != nil {
			return nil, fmt.Errorf("registering workload %s with the key broker: %w", res.WorkloadID, rerr)
		}
		res.Registered = true
		defer func() {
			if err == nil || undo == nil {
				return
			}
			// The caller's ctx may be the reason we fail; undo anyway.
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if uerr := undo(uctx); uerr != nil {
				err = fmt.Errorf("%w; the broker still holds workload %s, whose image was not written: remove it with `cwrun kbs workload rm %s` (%v)", err, res.WorkloadID, res.WorkloadID, uerr)
			}
		}()
	}

	// 1. The source image, flattened.
	stage("read", 0)
	img, err := sess.Open(ctx, src)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	dirs := chooseWorkDirs(opts.TmpDir, img)
	treeWork, err := mkWork(dirs.tree, "plain tree")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(treeWork)
	work := treeWork
	if dirs.layer != dirs.tree {
		if work, err = mkWork(dirs.layer, "sealed layer"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(work)
	}
	opts.Log.Debug("work folders", "tree", treeWork, "layer", work)
	krunConfig, err := json.Marshal(innerConfig(img.Config, opts.AllowOverrides))
	if err != nil {
		return nil, fmt.Errorf("encoding the image config: %w", err)
	}
	root, dropTree, err := prepareTree(ctx, sess, img, treeWork, krunConfig, opts)
	if err != nil {
		return nil, err
	}
	defer dropTree()

	// 2. Sizes, decided before anything is written so that the disk is
	// made in place.
	stage("measure", 0)
	st, err := measureTree(root)
	if err != nil {
		return nil, err
	}
	payload, err := diskSize(st, *opts.Slop)
	if err != nil {
		return nil, err
	}
	vol, err := luks.New(pass, payload, luks.Params{Version: opts.LUKS})
	if err != nil {
		return nil, fmt.Errorf("making the LUKS header: %w", err)
	}
	defer vol.Wipe()
	cfgJSON, err := res.Config.Marshal()
	if err != nil {
		return nil, err
	}
	payloadEnd := vol.PayloadOffset() + payload
	footer := sealed.Footer(payloadEnd, cfgJSON)
	res.TreeSize, res.PayloadSize = st.Bytes, payload
	res.DiskSize = payloadEnd + int64(len(footer))

	// 3. The layer file, with disk.img as its first entry: the disk's
	// bytes are the layer's bytes from diskOff on.
	layerPath := filepath.Join(work, "layer.tar")
	lf, err := os.OpenFile(layerPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	created := buildTime()
	diskHdr, err := tarHeader(&tar.Header{Name: sealed.DiskPath, Mode: 0o600, Size: res.DiskSize, ModTime: created, Typeflag: tar.TypeReg, Format: tar.FormatPAX})
	if err != nil {
		return nil, err
	}
	diskOff := int64(len(diskHdr))
	if err := lf.Truncate(diskOff + res.DiskSize); err != nil {
		return nil, fmt.Errorf("sizing the disk in %s: %w", work, err)
	}

	stage("mkfs", payload)
	if err := mkfs(ctx, mkfsPath, root, layerPath, diskOff+vol.PayloadOffset(), payload, st); err != nil {
		return nil, err
	}
	// The plain tree is no longer needed; dropping it now frees the
	// space the next stages may need.
	if err := dropTree(); err != nil {
		return nil, err
	}

	stage("encrypt", payload)
	if err := vol.EncryptFile(ctx, lf, diskOff+vol.PayloadOffset(), payload, 0); err != nil {
		return nil, fmt.Errorf("encrypting the disk: %w", err)
	}
	if _, err := lf.WriteAt(diskHdr, 0); err != nil {
		return nil, writeErr(work, err)
	}
	if _, err := lf.WriteAt(vol.Header(), diskOff); err != nil {
		return nil, writeErr(work, err)
	}
	if _, err := lf.WriteAt(footer, diskOff+payloadEnd); err != nil {
		return nil, writeErr(work, err)
	}
	if _, err := lf.Seek(diskOff+res.DiskSize, io.SeekStart); err != nil {
		return nil, err
	}
	if err := writeLayerRest(lf, res.DiskSize, cfgJSON, created); err != nil {
		return nil, writeErr(work, err)
	}

	if fi, err := lf.Stat(); err == nil {
		res.LayerSize = fi.Size()
	}

	// 4. The image around the layer, written to its destination.
	si := newSealedImage(img, res, opts, created)
	var d digest.Digest
	if name := images.LocalName(dstRef); name != "" {
		stage("write", res.LayerSize)
		if d, err = sess.WriteLocal(ctx, name, layerPath, si.blobs); err != nil {
			return nil, err
		}
	} else {
		stage("hash", 0)
		layout := filepath.Join(work, "oci")
		if err := stageLayout(layout, lf, layerPath, si); err != nil {
			return nil, err
		}
		stage("write", res.LayerSize)
		if d, err = sess.CopyLayout(ctx, layout, dstRef, dirs.layer, opts.Report); err != nil {
			return nil, err
		}
	}
	res.ManifestDigest = d.String()
	stage("", 0)
	opts.Log.Info("sealed", "source", src, "destination", res.Destination, "tee", opts.TEE,
		"workload_id", res.WorkloadID, "disk_bytes", res.DiskSize)
	return res, nil
}

// stageClock returns a function that ends the running stage, records
// its time, and starts the next ("" ends the last).
func stageClock(res *Result, progress func(Event)) func(string, int64) {
	var name string
	var start time.Time
	return func(next string, total int64) {
		now := time.Now()
		if name != "" {
			res.Stages = append(res.Stages, StageTime{name, now.Sub(start)})
			progress(Event{Stage: name, End: true})
		}
		name, start = next, now
		if next != "" {
			progress(Event{Stage: next, Total: total})
		}
	}
}

func writeErr(work string, err error) error {
	return fmt.Errorf("writing the sealed disk in %s: %w; free space there or set --tmpdir", work, err)
}

// buildTime is the time recorded in the image: SOURCE_DATE_EPOCH when
// set (reproducible builds), else now.
func buildTime() time.Time {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		var sec int64
		if _, err := fmt.Sscan(s, &sec); err == nil {
			return time.Unix(sec, 0).UTC()
		}
	}
	return time.Now().UTC().Truncate(time.Second)
}

// tarHeader returns the encoded header of one entry.
func tarHeader(h *tar.Header) ([]byte, error) {
	var b bytes.Buffer
	if err := tar.NewWriter(&b).WriteHeader(h); err != nil {
		return nil, fmt.Errorf("tar header for %s: %w", h.Name, err)
	}
	return b.Bytes(), nil
}

// writeLayerRest writes, after disk.img's content, its tar padding and
// the layout's other files.
func writeLayerRest(w io.Writer, diskSize int64, cfgJSON []byte, created time.Time) error {
	if pad := (512 - diskSize%512) % 512; pad > 0 {
		if _, err := w.Write(make([]byte, pad)); err != nil {
			return err
		}
	}
	tw := tar.NewWriter(w)
	entry := func(name string, mode int64, typ byte, body []byte) error {
		h := &tar.Header{Name: name, Mode: mode, Typeflag: typ, Size: int64(len(body)), ModTime: created, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(body)
		return err
	}
	if err := entry(sealed.ConfigPath, 0o600, tar.TypeReg, cfgJSON); err != nil {
		return err
	}
	if err := entry(sealed.EntrypointPath, 0o755, tar.TypeReg, sealed.Entrypoint()); err != nil {
		return err
	}
	if err := entry(sealed.TmpPath+"/", 0o1777, tar.TypeDir, nil); err != nil {
		return err
	}
	return tw.Close()
}

// flatten applies the image's layers, lowest first, onto root.
func flatten(ctx context.Context, img *images.Source, root string, progress func(Event)) error {
	for i := range img.Layers {
		r, err := img.Layer(ctx, i)
		if err != nil {
			return err
		}
		err = rootfs.Apply(ctx, root, r, rootfs.Options{})
		r.Close()
		if err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if errors.Is(err, syscall.ENOSPC) {
				return fmt.Errorf("flattening layer %d of %s into %s: %w; free space there or set --tmpdir", i, images.Ref(img.Ref), root, err)
			}
			return fmt.Errorf("layer %d (%s) of %s: %w", i, img.Layers[i].Digest, images.Ref(img.Ref), err)
		}
		progress(Event{Stage: "read", Done: int64(i + 1), Total: int64(len(img.Layers))})
	}
	return nil
}

// addFiles puts /.krun_config.json and the --add-file files into the
// tree through the same hardened extraction as the image's layers, so a
// destination path cannot escape the root through a symlink in the
// image.
func addFiles(ctx context.Context, root string, krunConfig []byte, files []AddFile) error {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	now := time.Unix(0, 0)
	hdr := &tar.Header{Name: sealed.KrunConfigInDisk, Mode: 0o644, Size: int64(len(krunConfig)), ModTime: now, Typeflag: tar.TypeReg}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if _, err := tw.Write(krunConfig); err != nil {
		return err
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if err := rootfs.Apply(ctx, root, io.MultiReader(bytes.NewReader(b.Bytes()), addFilesTar(files)), rootfs.Options{}); err != nil {
		return fmt.Errorf("adding files: %w", err)
	}
	return nil
}

// addFilesTar streams the --add-file files as tar entries, ending the archive.
func addFilesTar(files []AddFile) io.Reader {
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := func() error {
			for _, af := range files {
				if err := addOne(tw, af); err != nil {
					return err
				}
			}
			return tw.Close()
		}()
		pw.CloseWithError(err)
	}()
	return pr
}

func addOne(tw *tar.Writer, af AddFile) error {
	f, err := os.Open(af.Src)
	if err != nil {
		return fmt.Errorf("--add-file %s: %w", af.Src, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("--add-file %s: %w", af.Src, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("--add-file %s: not a regular file (folders are not supported; add each file)", af.Src)
	}
	h := &tar.Header{Name: strings.TrimPrefix(path.Clean(af.Dst), "/"), Mode: int64(fi.Mode().Perm()), Size: fi.Size(), ModTime: fi.ModTime(), Typeflag: tar.TypeReg}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if _, err := io.Copy(tw, f); err != nil {
		return fmt.Errorf("--add-file %s: %w", af.Src, err)
	}
	return nil
}

// innerConfig is the image config sealed inside the encrypted disk
// (/.krun_config.json). The overrides switch rides there, as the label
// sealed.LabelAllowOverrides, because only what is encrypted is out of
// the host's reach: the footer's copy is host-writable and serves only
// to refuse early on the host.
func innerConfig(c *imgspecv1.Image, allowOverrides bool) *imgspecv1.Image {
	if c == nil {
		c = &imgspecv1.Image{}
	}
	out := *c
	labels := make(map[string]string, len(c.Config.Labels)+1)
	for k, v := range c.Config.Labels {
		labels[k] = v
	}
	delete(labels, sealed.LabelAllowOverrides) // only the seal decides
	if allowOverrides {
		labels[sealed.LabelAllowOverrides] = "true"
	}
	if len(labels) == 0 {
		labels = nil
	}
	out.Config.Labels = labels
	return &out
}
