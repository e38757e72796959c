package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/internal/testimage"
	"github.com/cwrun/cwrun/launcher"
)

// needTPMBoot skips unless a measured boot can run here: QEMU and the
// rest of needVM, swtpm with its setup tools, and OVMF.
func needTPMBoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("slow: several UEFI boots under TCG")
	}
	needVM(t)
	need(t, "swtpm", "swtpm_setup", "swtpm_localca", "certtool")
	if _, err := os.Stat("/usr/share/OVMF/OVMF_CODE_4M.fd"); err != nil {
		if _, err := os.Stat("/usr/share/OVMF/OVMF_CODE.fd"); err != nil {
			t.Skip("needs UEFI firmware (Debian package ovmf)")
		}
	}
}

// guestStage matches the launcher's report of the guest's failure.
var guestStage = regexp.MustCompile(`the guest failed at (\w+)`)

// TestTPMAttestedRun is measured boot gating key release, end to end:
// `cwrun build --tee tpm --kbs` registers the disk key with the digests
// of what a tpm run boots and the vTPM CA the broker may trust; `cwrun
// run` boots OVMF + a fresh swtpm, the guest quotes its PCRs with an AK
// it proves by credential activation to live in a TPM whose EK the CA
// vouches for, the broker replays the event log and releases the key.
// Then each thing a host could change is denied, with the reason, and
// the guest powers off without the key.
func TestTPMAttestedRun(t *testing.T) {
	needTPMBoot(t)
	dir := t.TempDir()
	caDir, otherCADir := filepath.Join(dir, "vtpm-ca"), filepath.Join(dir, "other-ca")
	// The CLI an operator uses: the certificate to hand to the broker.
	ca := run(t, time.Minute, cwrunBin, "vtpm-ca", "--dir", caDir)
	if ca.code != 0 || !strings.HasPrefix(ca.stdout, "-----BEGIN CERTIFICATE-----") {
		t.Fatalf("cwrun vtpm-ca: exit %d\n%s%s", ca.code, ca.stdout, ca.stderr)
	}
	caCert := filepath.Join(dir, "vtpm-ca.pem")
	if err := os.WriteFile(caCert, []byte(ca.stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := launcher.TPMCA(otherCADir); err != nil {
		t.Fatal(err)
	}

	src := filepath.Join(dir, "src")
	testimage.WriteLayout(t, src, "v1", testimage.Config{
		Cmd: []string{"/bin/sh", "-c", sealedCmd}, Env: []string{"PATH=/bin", "FOO=bar"}, WorkingDir: "/work",
	}, busyboxLayer(t))
	kdir := kbsInit(t)
	f, err := os.OpenFile(filepath.Join(kdir, config.FileName), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("\n[tpm]\nek_ca = [\"" + caCert + "\"]\nrequire_eventlog = true\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b := startBroker(t, kdir, "--tees", "tpm")
	s := newStore(t)
	sealedRef := "oci:" + filepath.Join(dir, "sealed") + ":tpm"
	r := s.cwrun(t, "build", "--tee", "tpm", "--cpus", "1", "--memory", "512",
		"--kbs", b.url, "--kbs-admin-key", filepath.Join(kdir, config.AdminKeyFile), "--kbs-cacert", filepath.Join(kdir, config.TLSCertFile),
		"--tpm-ek-ca", caCert, "oci:"+src+":v1", sealedRef)
	if r.code != 0 {
		t.Fatalf("build --tee tpm --kbs: exit %d\n%s\nbroker log:\n%s", r.code, r.stderr, b.log())
	}
	m := workloadIDRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("build output names no workload id:\n%s", r.stdout)
	}
	id := m[1]
	w, err := b.admin(t).Workload(t.Context(), id)
	if err != nil {
		t.Fatalf("the broker does not know workload %s: %v", id, err)
	}
	for _, n := range []string{"ek_ca", "kernel_digest", "initrd_digest", "cmdline_digest"} {
		if len(w.References[n]) == 0 {
			t.Errorf("build registered no %s reference for the tpm workload: %v", n, w.References)
		}
	}

	e := newVMEnv(t, s)
	base := []string{"run", "--timings", "--kbs-cacert", filepath.Join(kdir, config.TLSCertFile), "--vtpm-ca", caDir}
	t.Run("released", func(t *testing.T) {
		r := e.run(t, append(base, sealedRef)...)
		if r.code != 3 || !strings.Contains(r.stdout, "hello from the guest") || !strings.Contains(r.stdout, "FOO=bar") {
			t.Fatalf("measured-boot run: exit %d (want 3)\nstdout: %s\nstderr: %s\nbroker log:\n%s", r.code, r.stdout, r.stderr, b.log())
		}
		t.Logf("took %s; timings:\n%s", r.elapsed, r.stderr)
	})

	t.Run("released without a network", func(t *testing.T) {
		// Other flags, the same boot: the initrd carries one module set
		// for every tpm run, so the registered digests still match.
		r := e.run(t, append(base, "--network", "none", sealedRef)...)
		if r.code != 3 || !strings.Contains(r.stdout, "hello from the guest") {
			t.Fatalf("measured-boot run with --network none: exit %d (want 3)\nstdout: %s\nstderr: %s\nbroker log:\n%s", r.code, r.stdout, r.stderr, b.log())
		}
		t.Logf("took %s; timings:\n%s", r.elapsed, r.stderr)
	})

	t.Run("other memory refused before the boot", func(t *testing.T) {
		// The kernel digest covers QEMU's boot header, which holds the
		// initrd's address, which follows the RAM size.
		r := e.run(t, append(base, "--memory", "768", sealedRef)...)
		if r.code != 125 || !strings.Contains(r.stderr, "sealed for tpm with 512 MiB") || strings.Contains(r.stderr, "cwrun timings") {
			t.Fatalf("--memory 768 on an image sealed for 512 MiB: exit %d\n%s", r.code, r.stderr)
		}
	})

	denied := func(t *testing.T, r vmResult, stage string, reasons ...string) {
		t.Helper()
		if r.code == 0 || r.code == 3 || strings.Contains(r.stdout, "hello from the guest") {
			t.Fatalf("a tampered boot got the key: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		if m := guestStage.FindStringSubmatch(r.stderr); m == nil || m[1] != stage {
			t.Errorf("want the guest to stop at %s (and power off), got:\n%s", stage, r.stderr)
		}
		for _, want := range reasons {
			if !strings.Contains(r.stderr, want) {
				t.Errorf("the denial does not say %q:\n%s\nbroker log:\n%s", want, r.stderr, b.log())
			}
		}
		t.Logf("the user sees:\n%s", r.stderr)
	}
	t.Run("changed kernel command line", func(t *testing.T) {
		r := e.run(t, append(base, "--x-cmdline-append", "cwrun.tampered=1", sealedRef)...)
		denied(t, r, "unlock", "403", "cmdline_digest")
	})
	t.Run("changed initrd", func(t *testing.T) {
		// The same init with one byte more: another initrd, as a host
		// that slipped its own program into the guest would boot.
		orig, err := os.ReadFile(filepath.Join(filepath.Dir(cwrunBin), "cwrun-init"))
		if err != nil {
			t.Fatal(err)
		}
		other := filepath.Join(t.TempDir(), "cwrun-init")
		if err := os.WriteFile(other, append(orig, 0), 0o755); err != nil {
			t.Fatal(err)
		}
		e2 := *e
		e2.extra = append(append([]string{}, e.extra...), "CWRUN_INIT="+other)
		r := e2.run(t, append(base, sealedRef)...)
		denied(t, r, "unlock", "403", "initrd_digest")
	})
	t.Run("vTPM of an untrusted CA", func(t *testing.T) {
		args := append(append([]string{}, base...), sealedRef)
		for i, a := range args {
			if a == caDir {
				args[i] = otherCADir
			}
		}
		r := e.run(t, args...)
		denied(t, r, "unlock", "401", "does not chain to a trusted EK CA")
	})
	t.Run("killed", func(t *testing.T) {
		// SIGKILL cwrun while the firmware boots: QEMU and swtpm die
		// with it, and the vTPM's state goes with the run folder.
		run := e.start(t, append(base, "--name", "tpmkilled", sealedRef)...)
		var kids map[string]int
		deadline := time.Now().Add(2 * time.Minute)
		for {
			kids = map[string]int{}
			for _, pid := range childrenOf(run.cmd.Process.Pid) {
				if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
					kids[strings.TrimSpace(string(b))] = pid
				}
			}
			if kids["swtpm"] != 0 && kids["qemu-system-x86"] != 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no swtpm and QEMU under cwrun within 2 minutes: %v\n%s", kids, run.stderr.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
		killedDir := filepath.Join(e.rtDir, "cwrun", "tpmkilled")
		if _, err := os.Stat(filepath.Join(killedDir, "tpm")); err != nil {
			t.Fatalf("the vTPM state is not in the run folder: %v", err)
		}
		run.cmd.Process.Kill()
		run.exitCode(t)
		for name, pid := range kids {
			for {
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				if err != nil || strings.Contains(string(b), ") Z ") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s %d outlived its SIGKILLed cwrun", name, pid)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		if r := e.runOnly(t, "cleanup"); r.code != 0 {
			t.Fatalf("cwrun cleanup: exit %d\n%s", r.code, r.stderr)
		}
		if _, err := os.Stat(killedDir); !os.IsNotExist(err) {
			t.Errorf("the killed run's folder (with its vTPM state) stays after cleanup: %v", err)
		}
	})
	t.Run("bench", func(t *testing.T) {
		out := os.Getenv("CWRUN_BENCH_TPM_OUT")
		if os.Getenv("CWRUN_BENCH") == "" || out == "" {
			t.Skip("make bench's TPM cold start (hack/bench-tpm.sh)")
		}
		benchTPMRuns(t, e, append(base, sealedRef), out)
	})
	if strings.Contains(b.log(), "passphrase\":\"") {
		t.Errorf("the broker logged a passphrase:\n%s", b.log())
	}
}

// timingLine is a line of `cwrun run --timings`: the host's ms since the
// VMM started, and for guest stages the guest's boot clock.
var timingLine = regexp.MustCompile(`(?m)^\s+(\S.*?)\s+(\d+) ms(?:\s+guest\s+(\d+) ms)?`)

// benchTPMRuns times measured-boot runs and writes medians to out:
// the firmware's share (the host's clock at the guest's first stage
// minus the guest's own), the guest kernel, and attestation from the
// guest's config to its key, with the part spent in TPM commands.
func benchTPMRuns(t *testing.T, e *vmEnv, args []string, out string) {
	const runs = 5
	series := map[string][]float64{}
	for i := 0; i <= runs; i++ {
		r := e.run(t, args...)
		if r.code != 3 {
			t.Fatalf("bench run: exit %d\n%s", r.code, r.stderr)
		}
		host, guest := map[string]float64{}, map[string]float64{}
		for _, m := range timingLine.FindAllStringSubmatch(r.stderr, -1) {
			host[m[1]] = atof(t, m[2])
			if m[3] != "" {
				guest[m[1]] = atof(t, m[3])
			}
		}
		const booted, config, key = "guest kernel booted, modules loaded", "guest got its config", "guest got its key (attestation)"
		for _, st := range []string{booted, config, key, "guest key: tpm attester ready", "guest key: auth parameters",
			"guest key: challenge answered", "guest key: evidence made", "guest key: challenge received"} {
			if _, ok := guest[st]; !ok {
				t.Fatalf("no %q in the timings:\n%s", st, r.stderr)
			}
		}
		if i == 0 {
			continue // warm-up: page cache, initrd cache
		}
		step := func(name, prev string) float64 { return guest[name] - guest[prev] }
		series["total (exec to exit)"] = append(series["total (exec to exit)"], float64(r.elapsed.Milliseconds()))
		series["firmware (OVMF, until the kernel starts)"] = append(series["firmware (OVMF, until the kernel starts)"], host[booted]-guest[booted])
		series["guest kernel + modules"] = append(series["guest kernel + modules"], guest[booted])
		series["attestation (config to key)"] = append(series["attestation (config to key)"], guest[key]-guest[config])
		tpmCmds := step("guest key: tpm attester ready", "guest key: random pool seeded") +
			step("guest key: auth parameters", "guest key: tpm attester ready") +
			step("guest key: challenge answered", "guest key: challenge received") +
			step("guest key: evidence made", "guest key: challenge answered")
		series["  of which TPM commands (AK, EK cert, activation, quote)"] = append(series["  of which TPM commands (AK, EK cert, activation, quote)"], tpmCmds)
		series["  of which broker round trips (auth, attest+resource)"] = append(series["  of which broker round trips (auth, attest+resource)"],
			step("guest key: challenge received", "guest key: auth parameters")+step(key, "guest key: evidence made"))
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "bench: cwrun run of a --tee tpm image (OVMF + swtpm, TCG, 512 MiB, 1 vCPU), median of %d runs after a warm-up, ms:\n", runs)
	for _, k := range []string{"total (exec to exit)", "firmware (OVMF, until the kernel starts)", "guest kernel + modules",
		"attestation (config to key)", "  of which TPM commands (AK, EK cert, activation, quote)", "  of which broker round trips (auth, attest+resource)"} {
		v := series[k]
		sort.Float64s(v)
		fmt.Fprintf(&sb, "  %-58s %7.0f  (range %.0f-%.0f)\n", k, v[len(v)/2], v[0], v[len(v)-1])
	}
	if err := os.WriteFile(out, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func atof(t *testing.T, s string) float64 {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		t.Fatal(err)
	}
	return f
}
