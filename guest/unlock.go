package guest

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/cwrun/cwrun/build/luks"
	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/sealed"
)

// KeySource gives the passphrase of the sealed disk. Development mode
// takes it from the host's config (ConfigPassphrase); attested key
// release asks the broker (BrokerKey). sc is the disk footer's workload
// config: host-controlled, so it may only say where to ask, never what
// to trust.
type KeySource interface {
	Passphrase(ctx context.Context, cfg *proto.Config, sc sealed.Config) ([]byte, error)
}

// ConfigPassphrase is the development-mode KeySource: the host sent the
// passphrase in its config, so the host can read the disk anyway.
type ConfigPassphrase struct{}

// Passphrase returns the config's passphrase.
func (ConfigPassphrase) Passphrase(_ context.Context, cfg *proto.Config, _ sealed.Config) ([]byte, error) {
	if cfg.Passphrase == "" {
		return nil, errors.New("no passphrase in the host's config: pass --passphrase-file (development mode)")
	}
	return []byte(cfg.Passphrase), nil
}

// stagedKeys reports the end of an attested key release as its own
// stage, so that --timings shows attestation apart from the unlock.
type stagedKeys struct {
	KeySource
	done func()
}

func (k stagedKeys) Passphrase(ctx context.Context, cfg *proto.Config, sc sealed.Config) ([]byte, error) {
	p, err := k.KeySource.Passphrase(ctx, cfg, sc)
	if err == nil {
		k.done()
	}
	return p, err
}

// ErrWrongPassphrase is what the host is told; it names no secret.
var ErrWrongPassphrase = errors.New("wrong passphrase for the sealed disk")

// mapperName is the dm device of the decrypted root.
const mapperName = "cwrun-root"

// unlocked is the opened disk.
type unlocked struct {
	Device string        // /dev/mapper/cwrun-root
	Sealed sealed.Config // the footer's workload config: host-controlled, so trusted for nothing
	Info   luks.Info     // for the log
}

// unlock opens the sealed disk at diskPath: reads its footer and LUKS
// header, unlocks a keyslot with the passphrase from keys, and maps the
// payload with dm-crypt. The volume key is wiped from our memory (and,
// via DM_SECURE_DATA_FLAG, from the kernel's ioctl buffer) before it
// returns.
func unlock(ctx context.Context, diskPath string, cfg *proto.Config, keys KeySource) (*unlocked, error) {
	disk, err := os.Open(diskPath)
	if err != nil {
		return nil, fmt.Errorf("opening the sealed disk %s: %w (is it attached as the first virtio disk?)", diskPath, err)
	}
	defer disk.Close()
	size, err := disk.Seek(0, 2)
	if err != nil {
		return nil, fmt.Errorf("sizing %s: %w", diskPath, err)
	}
	// The footer is often out of sight: a block device ends at a
	// 512-byte boundary and the footer's JSON has any length, so the
	// last bytes of an unpadded disk.img never reach the guest. Without
	// it the guest assumes the defaults (no overrides) and maps the
	// payload to the end of the device, as cryptsetup open does.
	var sc sealed.Config
	footerAt := int64(-1)
	if raw, at, err := readFooter(disk, size); err == nil {
		if sc, err = sealed.ParseConfig(raw); err != nil {
			return nil, fmt.Errorf("%s: %w", diskPath, err)
		}
		footerAt = at
	} else if !errors.Is(err, sealed.ErrNoFooter) {
		return nil, fmt.Errorf("%s: %w", diskPath, err)
	}

	pass, err := keys.Passphrase(ctx, cfg, sc)
	if err != nil {
		return nil, err
	}
	vol, err := luks.Open(disk, pass)
	clear(pass)
	if err != nil {
		if errors.Is(err, luks.ErrWrongPassphrase) {
			return nil, ErrWrongPassphrase
		}
		return nil, fmt.Errorf("reading the LUKS header of %s: %w", diskPath, err)
	}
	defer vol.Wipe()
	info := vol.Info()

	length, err := payloadLength(info, footerAt, size)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", diskPath, err)
	}
	key := vol.VolumeKey() // a copy: ours to wipe
	params := cryptParams(info, key, diskPath)
	clear(key)
	dev, err := dmCreate(mapperName, []dmTarget{{Start: 0, Length: uint64(length / 512), Type: "crypt", Params: params}}, false)
	clear(params)
	if err != nil {
		return nil, err
	}
	path, err := mknodMapper(mapperName, dev)
	if err != nil {
		return nil, err
	}
	return &unlocked{Device: path, Sealed: sc, Info: info}, nil
}

// payloadLength is how many bytes dm-crypt maps: a LUKS2 segment's
// fixed size; else (LUKS1, LUKS2 "dynamic") up to the footer, whose
// JSON starts 4096-aligned after zero padding; else, with no footer in
// sight, to the end of the device.
func payloadLength(info luks.Info, footerAt, size int64) (int64, error) {
	sector := int64(info.SectorSize)
	if sector == 0 {
		sector = 512
	}
	n := info.PayloadSize
	switch {
	case n > 0:
	case footerAt >= 0:
		n = footerAt&^(sealed.Align-1) - info.PayloadOffset
	default:
		n = (size - info.PayloadOffset) / sector * sector
	}
	if n <= 0 || n%sector != 0 || info.PayloadOffset%512 != 0 || info.PayloadOffset+n > size {
		return 0, fmt.Errorf("corrupt layout: payload at %d, %d bytes, footer at %d, device of %d bytes, %d-byte sectors", info.PayloadOffset, n, footerAt, size, sector)
	}
	return n, nil
}

// readFooter finds the krun footer at the end of the device, or, when
// the host padded the disk to whole sectors (as a qcow2 overlay does),
// before up to 511 trailing zero bytes.
func readFooter(r io.ReaderAt, size int64) ([]byte, int64, error) {
	raw, at, err := sealed.ReadFooter(r, size)
	if !errors.Is(err, sealed.ErrNoFooter) {
		return raw, at, err
	}
	tail := make([]byte, min(size, 1024))
	base := size - int64(len(tail))
	if _, err := r.ReadAt(tail, base); err != nil {
		return nil, 0, fmt.Errorf("reading the disk's end: %w", err)
	}
	for end := len(tail); end >= 12 && len(tail)-end < 512; end-- {
		if end < len(tail) && tail[end] != 0 {
			break
		}
		if string(tail[end-12:end-8]) == "KRUN" {
			if raw, at, err := sealed.ReadFooter(r, base+int64(end)); err == nil {
				return raw, at, nil
			}
		}
	}
	return nil, 0, sealed.ErrNoFooter
}

// cryptParams is the dm-crypt table's parameters:
// "<cipher> <hexkey> <iv_offset> <device> <offset> [<#opt> <opt>...]".
// The IV stays the 512-byte sector number even with 4096-byte sectors
// (no iv_large_sectors): that is what LUKS2 and cryptsetup use.
// Built in a []byte, not a string, so that it can be wiped.
func cryptParams(info luks.Info, key []byte, device string) []byte {
	b := make([]byte, 0, 256+2*len(key))
	b = append(b, info.CipherSpec()...)
	b = append(b, ' ')
	b = hex.AppendEncode(b, key)
	b = append(b, " 0 "...)
	b = append(b, device...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, info.PayloadOffset/512, 10)
	if info.SectorSize > 512 {
		b = append(b, " 1 sector_size:"...)
		b = strconv.AppendInt(b, int64(info.SectorSize), 10)
	}
	return b
}
