package tests

// The cold-start benchmark of `cwrun run` (hack/bench-run.sh, make
// bench): QEMU's start to the workload's first output line, against the
// floor of the same QEMU and kernel booting an initrd whose init powers
// off at once; plus cwrun's own memory (QEMU, a child, not counted):
// its peak RSS (VmHWM, at exit) and its RSS while the workload runs
// (VmRSS, sampled from outside 1 s after the first output line), each
// split into anonymous memory and pages of the cwrun binary.
//
// The binary's pages count in RSS as the kernel maps them, and how many
// a fault maps depends on the page cache's folios: on this kernel a
// freshly written binary (a new build) maps several MiB more than the
// same binary read back from disk. The benchmark drops the fresh
// binary's page cache once before its runs, so that it measures the
// state of any installed binary after its first read.

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/testimage"
	"github.com/cwrun/cwrun/launcher"
	"github.com/cwrun/cwrun/launcher/initrd"
	"github.com/cwrun/cwrun/launcher/kernel"
	"github.com/cwrun/cwrun/launcher/qemu"
	"github.com/cwrun/cwrun/launcher/vm"
	"golang.org/x/sys/unix"
)

const floorInit = `package main

import "syscall"

func main() {
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	for {
		syscall.Pause()
	}
}
`

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func TestRunBenchmark(t *testing.T) {
	if os.Getenv("CWRUN_BENCH") == "" {
		t.Skip("a benchmark: run hack/bench-run.sh (or set CWRUN_BENCH=1)")
	}
	needVM(t)
	needRoot(t)
	const runs = 5
	dir := t.TempDir()
	cache := filepath.Join(os.TempDir(), "cwrun-e2e-cache")

	// The floor: the same QEMU and kernel, an init that powers off.
	floorInitPath := tinyInit(t, floorInit)
	k, err := kernel.Fetcher{CacheDir: filepath.Join(cache, "cwrun", "kernel")}.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	floorInitrd, err := initrd.Build(context.Background(), initrd.Spec{Init: floorInitPath, CacheDir: filepath.Join(dir, "initrd")})
	if err != nil {
		t.Fatal(err)
	}
	run, err := os.MkdirTemp("", "cwfl")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(run)
	// Two floors: the plain boot of the figure, and the same
	// kernel command line as cwrun's (which turns off ACPI interrupt
	// routing and the crypto self-tests, see launcher.Cmdline).
	floorArgs := map[string][]string{}
	for name, cmdline := range map[string]string{"plain": "console=ttyS0 quiet panic=-1", "cwrun": launcher.Cmdline} {
		a, err := qemu.Args(vm.Spec{Name: "floor", Kernel: k.Vmlinuz, Initrd: floorInitrd, Cmdline: cmdline,
			CPUs: 1, MemoryMiB: 512, Accel: vm.AccelTCG, Console: filepath.Join(run, "console"), RunDir: run})
		if err != nil {
			t.Fatal(err)
		}
		floorArgs[name] = a
	}
	floor := map[string][]time.Duration{}
	bootFloor := func(i int, name string) {
		start := time.Now()
		if out, err := exec.Command("qemu-system-x86_64", floorArgs[name]...).CombinedOutput(); err != nil {
			t.Fatalf("floor boot: %v\n%s", err, out)
		}
		if i > 0 { // the first run warms the page cache
			floor[name] = append(floor[name], time.Since(start))
		}
	}

	// cwrun: a sealed busybox in local storage, 512 MiB, 1 vCPU.
	layout := filepath.Join(dir, "src")
	// The sleep keeps the workload running while cwrun's RSS is sampled.
	testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/bin/sh", "-c", "echo first line; sleep 2; echo second line"}}, busyboxLayer(t))
	s := newStore(t)
	key := writeKey(t, dir, "bench-passphrase")
	if r := s.cwrun(t, "build", "--tee", "sample", "--cpus", "1", "--memory", "512", "--passphrase-file", key, "oci:"+layout+":v1", "localhost/bench:sealed"); r.code != 0 {
		t.Fatalf("seal: %s", r.stderr)
	}
	rt, _ := os.MkdirTemp("", "cwrt")
	defer os.RemoveAll(rt)
	if err := dropPageCache(cwrunBin); err != nil {
		t.Fatal(err)
	}
	var first, total []time.Duration
	var hwm, mid []int
	var timings, hwmSplit, midSplit string
	for i := 0; i <= runs; i++ {
		// Interleaved, so that the load of this shared machine weighs
		// on the floors and on cwrun alike.
		bootFloor(i, "plain")
		bootFloor(i, "cwrun")
		rssFile := filepath.Join(dir, "rss")
		cmd := exec.Command(cwrunBin, s.flags("run", "--accel", "tcg", "--network", "none", "--timings", "--passphrase-file", key, "localhost/bench:sealed")...)
		cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+cache, "XDG_RUNTIME_DIR="+rt, "CWRUN_RSS_REPORT="+rssFile)
		var errb strings.Builder
		cmd.Stderr = &errb
		out, _ := cmd.StdoutPipe()
		start := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		var firstAt time.Duration
		sampled := make(chan map[string]int, 1)
		for sc.Scan() {
			if firstAt == 0 {
				firstAt = time.Since(start)
				go func() {
					time.Sleep(time.Second)
					sampled <- memStatus(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
				}()
			}
		}
		if err := cmd.Wait(); err != nil || firstAt == 0 {
			t.Fatalf("cwrun run: %v\n%s", err, errb.String())
		}
		running := <-sampled
		if i == 0 {
			continue // warms the caches (initrd, page cache)
		}
		first, total = append(first, firstAt), append(total, time.Since(start))
		end := memStatus(rssFile)
		if end["VmHWM"] == 0 || running["VmRSS"] == 0 {
			t.Fatalf("no memory figures: at exit %v, while running %v", end, running)
		}
		hwm, mid = append(hwm, end["VmHWM"]), append(mid, running["VmRSS"])
		if i == runs {
			hwmSplit = fmt.Sprintf("at exit %d KiB anonymous + %d KiB of the binary", end["RssAnon"], end["RssFile"])
			midSplit = fmt.Sprintf("%d KiB anonymous + %d KiB of the binary", running["RssAnon"], running["RssFile"])
		}
		timings = errb.String()
	}
	if len(hwm) != runs {
		t.Fatalf("%d RSS reports for %d runs", len(hwm), runs)
	}
	sort.Ints(hwm)
	sort.Ints(mid)
	fp, fc, c := median(floor["plain"]), median(floor["cwrun"]), median(first)
	report := fmt.Sprintf("cwrun run cold start (TCG, 512 MiB, 1 vCPU, median of %d, runs interleaved):\n"+
		"  floor, plain cmdline (QEMU + kernel + power-off init, start to exit): %s  %v\n"+
		"  floor, cwrun's cmdline:                                               %s  %v\n"+
		"  cwrun run, exec to the first output line:                             %s  %v\n"+
		"    = %.2fx the plain floor, %.2fx the floor with cwrun's cmdline (target <= 1.30x)\n"+
		"  cwrun run, exec to exit (the workload sleeps 2 s):                    %s\n"+
		"  cwrun's own memory (target <= 30 MiB; QEMU not counted):\n"+
		"    peak RSS (VmHWM):                  median %d KiB, max %d KiB (last run: %s)\n"+
		"    RSS while the workload runs (VmRSS): median %d KiB, max %d KiB (last run: %s)\n"+
		"last run's breakdown:\n%s",
		runs, fp.Round(time.Millisecond), floor["plain"], fc.Round(time.Millisecond), floor["cwrun"], c.Round(time.Millisecond), first,
		float64(c)/float64(fp), float64(c)/float64(fc), median(total).Round(time.Millisecond),
		hwm[len(hwm)/2], hwm[len(hwm)-1], hwmSplit, mid[len(mid)/2], mid[len(mid)-1], midSplit, timings)
	t.Log("\n" + report)
	if out := os.Getenv("CWRUN_BENCH_OUT"); out != "" {
		os.WriteFile(out, []byte(report), 0o644)
	}
}

// memStatus reads the kB figures of a /proc/PID/status file.
func memStatus(path string) map[string]int {
	m := map[string]int{}
	b, _ := os.ReadFile(path)
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || !strings.HasSuffix(v, " kB") {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(v, " kB"))); err == nil {
			m[k] = n
		}
	}
	return m
}

// dropPageCache evicts a file's pages from the page cache (see the
// comment at the top).
func dropPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return err
	}
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}
