package artifact

import "errors"

// The artifact cwrun pushes for a sealed disk (`cwrun push --artifact`):
//
//	manifest   application/vnd.oci.image.manifest.v1+json (OCI 1.1)
//	  artifactType  ArtifactTypeSealedDisk
//	  config        the empty descriptor (MediaTypeEmpty, "{}")
//	  layers[0]     MediaTypeSealedDiskZstd: disk.img, zstd-compressed;
//	                annotations: org.opencontainers.image.title "disk.img.zst",
//	                AnnotationDiskDigest and AnnotationDiskSize of the
//	                uncompressed disk
//	  subject       the manifest of the image that was sealed
//	  annotations   the sealed image's io.cwrun.* annotations, and
//	                org.opencontainers.image.created
const (
	ArtifactTypeSealedDisk  = "application/vnd.cwrun.sealed-disk.v1"
	MediaTypeSealedDiskZstd = "application/vnd.cwrun.disk.raw.v1+zstd"
	MediaTypeEmpty          = "application/vnd.oci.empty.v1+json"

	// AnnotationDiskDigest and AnnotationDiskSize, on a disk layer, give
	// the digest and size of the uncompressed disk; Pull checks them
	// when present.
	AnnotationDiskDigest = "io.cwrun.disk.digest"
	AnnotationDiskSize   = "io.cwrun.disk.size"

	// AnnotationDiskType is podman machine's key on index entries.
	AnnotationDiskType = "disktype"
	// AnnotationTitle names a layer's file (OCI's standard key).
	AnnotationTitle = "org.opencontainers.image.title"
	// AnnotationCreated is OCI's creation time, used to choose the
	// newest of several referrers.
	AnnotationCreated = "org.opencontainers.image.created"
	// AnnotationBaseName and AnnotationBaseDigest are OCI's keys for the
	// image an image was made from; push uses them as the subject when
	// the sealed image carries them.
	AnnotationBaseName   = "org.opencontainers.image.base.name"
	AnnotationBaseDigest = "org.opencontainers.image.base.digest"
)

// Errors a caller may test with errors.Is.
var (
	// ErrDigestMismatch: what the registry sent is not what the manifest names.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrTruncated: the download ended before the layer's size.
	ErrTruncated = errors.New("download truncated")
	// ErrNoMatch: an index has no entry for this platform and disk type.
	ErrNoMatch = errors.New("no matching entry")
	// ErrUnknownCompression: a layer is compressed in a way cwrun cannot read.
	ErrUnknownCompression = errors.New("unknown compression")
	// ErrNoDisk: the reference holds nothing that is a disk.
	ErrNoDisk = errors.New("no disk found")
	// ErrNoReferrer: the image has no referrer of the wanted artifact type.
	ErrNoReferrer = errors.New("no referrer found")
	// ErrUnreachable: the registry could not be reached.
	ErrUnreachable = errors.New("registry unreachable")
)
