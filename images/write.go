package images

import (
	"context"
	"fmt"
	"io"

	digest "github.com/opencontainers/go-digest"
	"go.podman.io/image/v5/copy"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/oci/layout"
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/types"
)

// CopyLayout copies the one image in the OCI layout folder dir to dst,
// under the policy of policy.json, and returns the written manifest's
// digest. Blobs are never recompressed (an encrypted disk does not
// compress, and the digest then stays the same in every transport).
// tmp, when set, is where c/image stages big blobs on their way.
func (s *Session) CopyLayout(ctx context.Context, dir string, dst types.ImageReference, tmp string, report io.Writer) (digest.Digest, error) {
	src, err := layout.NewReference(dir, "")
	if err != nil {
		return "", fmt.Errorf("staged image in %s: %w", dir, err)
	}
	pc, err := s.policy()
	if err != nil {
		return "", err
	}
	defer pc.Destroy()
	sys := *s.System()
	if tmp != "" {
		sys.BigFilesTemporaryDir = tmp
	}
	raw, err := copy.Image(ctx, pc, dst, src, &copy.Options{
		ReportWriter:    report,
		SourceCtx:       &sys,
		DestinationCtx:  &sys,
		PreserveDigests: true,
	})
	if err != nil {
		return "", contextDone(ctx, fmt.Errorf("writing %s: %w", Ref(dst), err))
	}
	d, err := manifest.Digest(raw)
	if err != nil {
		return "", fmt.Errorf("digest of the written manifest: %w", err)
	}
	return d, nil
}

// Delete removes an image from its transport, where that is possible
// (local storage, OCI layouts). Used to undo a half-finished write.
func (s *Session) Delete(ctx context.Context, ref types.ImageReference) error {
	return ref.DeleteImage(ctx, s.System())
}

// policy reads policy.json as podman does.
func (s *Session) policy() (*signature.PolicyContext, error) {
	policy, err := signature.DefaultPolicy(s.System())
	if err != nil {
		return nil, fmt.Errorf("reading policy.json: %w (podman's /etc/containers/policy.json; Debian ships it in containers-common)", err)
	}
	pc, err := signature.NewPolicyContext(policy)
	if err != nil {
		return nil, fmt.Errorf("policy.json: %w", err)
	}
	return pc, nil
}

// allowed checks an image against policy.json's rules for reading it.
func (s *Session) allowed(ctx context.Context, img types.UnparsedImage) error {
	pc, err := s.policy()
	if err != nil {
		return err
	}
	defer pc.Destroy()
	if ok, err := pc.IsRunningImageAllowed(ctx, img); !ok {
		return fmt.Errorf("policy.json refuses %s: %w", Ref(img.Reference()), err)
	}
	return nil
}
