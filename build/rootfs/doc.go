// Package rootfs flattens the layers of an OCI image into one root file
// system directory, the tree that build then turns into an ext4 disk.
//
// Layers come from untrusted images, so every tar entry is hostile until
// proven otherwise. The package must never create, change or delete
// anything outside the target directory: names with ".." are refused,
// every path is resolved inside the directory (symlinks in the tree are
// treated as rooted at it, as they will be in the guest), and the last
// component of a name is never followed. It must never hold a whole file
// in memory: content is streamed from the tar reader to the disk.
package rootfs
