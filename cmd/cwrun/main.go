// Command cwrun seals OCI images into confidential workloads and runs
// them as microVMs. Each verb lives in its own file and calls one
// library function.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"
	"go.podman.io/storage/pkg/reexec"
)

func main() {
	// c/storage re-executes this binary to unpack layers in a chroot.
	if reexec.Init() {
		return
	}
	// c/image and c/storage log through logrus; their info lines
	// ("using prior storage driver") are noise to a cwrun user.
	logrus.SetLevel(logrus.WarnLevel)
	// The first SIGINT/SIGTERM cancels the work, which then cleans up
	// after itself; exit codes follow the shell's 128+N convention.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	// Read before stop(): stop cancels the context too.
	interrupted := ctx.Err() != nil
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(int(ee))
		}
		fmt.Fprintln(os.Stderr, "cwrun:", err)
		if interrupted {
			os.Exit(130)
		}
		os.Exit(1)
	}
}

// exitError carries a workload's exit status out of a verb.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
