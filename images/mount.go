package images

import (
	"errors"
	"fmt"
	"sync"

	istorage "go.podman.io/image/v5/storage"
)

// ErrNotMountable says an image cannot be mounted because it is not in
// local storage; read its layers instead.
var ErrNotMountable = errors.New("image is not in local storage, so it cannot be mounted")

// Mount mounts the root file system of a local-storage image read-only
// (the graph driver's image mount, as `podman image mount` does) and
// returns the folder and the function that unmounts it (safe to call
// twice). It returns ErrNotMountable for images of other transports.
func (s *Session) Mount(src *Source) (dir string, unmount func() error, err error) {
	// Compare names: a storage reference carries its own copy of the transport.
	if src.Ref.Transport().Name() != storageTransport {
		return "", nil, ErrNotMountable
	}
	st, err := s.Store()
	if err != nil {
		return "", nil, err
	}
	img, err := istorage.Transport.GetStoreImage(st, src.Ref)
	if err != nil {
		return "", nil, fmt.Errorf("finding %s in local storage: %w", Ref(src.Ref), err)
	}
	dir, err = st.MountImage(img.ID, []string{"ro"}, "")
	if err != nil {
		return "", nil, fmt.Errorf("mounting %s read-only: %w", Ref(src.Ref), err)
	}
	var once sync.Once
	var uerr error
	return dir, func() error {
		once.Do(func() {
			if _, err := st.UnmountImage(img.ID, false); err != nil {
				uerr = fmt.Errorf("unmounting %s: %w", Ref(src.Ref), err)
			}
		})
		return uerr
	}, nil
}
