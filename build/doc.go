// Package build seals an ordinary OCI image into a confidential-workload
// image: it flattens the image's layers into one root file system, adds
// the image config as /.krun_config.json, makes an ext4 file system of
// it, encrypts that with LUKS and writes the krun layout (/disk.img,
// /krun-sev.json, /entrypoint, /tmp) as a one-layer OCI image.
//
// The disk is built in place inside the layer file that becomes the
// image's only blob, so sealing makes no extra full copy of the disk.
//
// It must never talk to a VMM, and never write the passphrase anywhere
// but into the LUKS key slot (no temp file, no log, no image config).
package build
