package launcher

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/launcher/vm"
)

// A tpm run gets a software TPM of its own: swtpm_setup manufactures it
// (EK, EK certificate and platform certificate, signed by cwrun's vTPM
// CA) in the run folder, and `swtpm socket` serves it to QEMU. Its
// state lives and dies with the run folder, so a SIGKILLed cwrun leaves
// nothing that Cleanup does not remove (swtpm itself dies with cwrun:
// parent-death signal, and it ends when QEMU hangs up: --terminate).
//
// The EK certificate is what a broker trusts (its [tpm] ek_ca): a fresh
// vTPM has a fresh EK and AK on every run, so only a CA can vouch for
// it. The CA is cwrun's own, in Options.TPMCADir, made on first use, and
// never the host's /var/lib/swtpm-localca that any other user of
// swtpm_setup writes to.

// TPMCAFile is the CA certificate (PEM) in a vTPM CA folder: the file a
// broker's [tpm] ek_ca names.
const TPMCAFile = "issuercert.pem"

// ErrNoSwtpm says the software TPM is not installed.
var ErrNoSwtpm = errors.New("the software TPM is not installed (swtpm and swtpm_setup): install Debian's swtpm and swtpm-tools (apt-get install swtpm swtpm-tools), or pass the host's TPM with --tpm /dev/tpm0")

// DefaultTPMCADir is where cwrun keeps its vTPM CA: /var/lib/cwrun/vtpm-ca
// as root, else $XDG_DATA_HOME/cwrun/vtpm-ca (~/.local/share/...).
func DefaultTPMCADir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/cwrun/vtpm-ca"
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "cwrun", "vtpm-ca")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "share", "cwrun", "vtpm-ca")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("cwrun-%d-vtpm-ca", os.Geteuid()))
}

// TPMCA makes the vTPM CA in dir (DefaultTPMCADir when empty) unless it
// is there, and returns the path of its certificate: the file to list in
// a broker's [tpm] ek_ca. The files swtpm_setup and swtpm_localca read
// (their configuration, pointing at this folder) are written too.
func TPMCA(dir string) (string, error) {
	if dir == "" {
		dir = DefaultTPMCADir()
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("vTPM CA folder: %w", err)
	}
	cert := filepath.Join(dir, TPMCAFile)
	key := filepath.Join(dir, "signkey.pem")
	if _, err := os.Stat(cert); errors.Is(err, os.ErrNotExist) {
		if err := makeTPMCA(dir, cert, key); err != nil {
			return "", fmt.Errorf("making the vTPM CA in %s: %w", dir, err)
		}
	} else if err != nil {
		return "", fmt.Errorf("vTPM CA: %w", err)
	}
	files := map[string]string{
		"swtpm-localca.conf": fmt.Sprintf("statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n",
			dir, key, cert, filepath.Join(dir, "certserial")),
		"swtpm-localca.options": "--platform-manufacturer cwrun\n--platform-version 2.1\n--platform-model QEMU\n",
		"swtpm_setup.conf": fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
			filepath.Join(dir, "swtpm-localca.conf"), filepath.Join(dir, "swtpm-localca.options")),
	}
	if p, err := exec.LookPath("swtpm_localca"); err == nil {
		files["swtpm_setup.conf"] = strings.Replace(files["swtpm_setup.conf"], "/usr/bin/swtpm_localca", p, 1)
	}
	for name, text := range files {
		p := filepath.Join(dir, name)
		if b, err := os.ReadFile(p); err == nil && string(b) == text {
			continue
		}
		if err := writeAtomic(p, []byte(text), 0o600); err != nil {
			return "", fmt.Errorf("vTPM CA: %w", err)
		}
	}
	return cert, nil
}

// makeTPMCA makes a self-signed ECDSA P-256 CA (swtpm_cert signs EK
// certificates with it). Its key is written before its certificate, so
// a half-made CA is made again rather than used.
func makeTPMCA(dir, certPath, keyPath string) error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// The serial's start in the name tells two hosts' CAs apart
		// in a broker's denials.
		Subject:               pkix.Name{CommonName: "cwrun vTPM EK CA " + serial.Text(16)[:min(8, len(serial.Text(16)))], Organization: []string{"cwrun"}, OrganizationalUnit: []string{host}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return err
	}
	if err := writeAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(dir, "certserial"), []byte("1\n"), 0o600); err != nil {
		return err
	}
	return writeAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func writeAtomic(p string, b []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".*")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), mode)
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// swtpmTools finds swtpm and swtpm_setup.
func swtpmTools() (swtpm, setup string, err error) {
	if swtpm, err = exec.LookPath("swtpm"); err != nil {
		return "", "", ErrNoSwtpm
	}
	if setup, err = exec.LookPath("swtpm_setup"); err != nil {
		return "", "", ErrNoSwtpm
	}
	if _, err = exec.LookPath("swtpm_localca"); err != nil {
		return "", "", ErrNoSwtpm
	}
	return swtpm, setup, nil
}

// manufactureTPM makes a fresh TPM 2.0 state in dir: EK (RSA and ECC),
// EK and platform certificates signed by the CA in caDir, SHA-256 bank.
func manufactureTPM(ctx context.Context, setup, dir, caDir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("vTPM state folder: %w", err)
	}
	logPath := filepath.Join(dir, "setup.log")
	cmd := exec.CommandContext(ctx, setup, "--tpm2", "--tpmstate", dir,
		"--create-ek-cert", "--create-platform-cert", "--pcr-banks", "sha256",
		"--config", filepath.Join(caDir, "swtpm_setup.conf"), "--logfile", logPath, "--overwrite")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("manufacturing the vTPM (swtpm_setup in %s): %v: %s%s", dir, err, strings.TrimSpace(out.String()), logTail(logPath))
	}
	return nil
}

func logTail(p string) string {
	b, err := os.ReadFile(p)
	if err != nil || len(b) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 6 {
		lines = lines[len(lines)-6:]
	}
	return "; log: " + strings.Join(lines, " | ")
}

// vtpm is a running swtpm serving one VM.
type vtpm struct {
	ctrl string
	done chan struct{}
	pid  int
}

// startSwtpm serves the TPM state in dir on a control socket for QEMU.
// swtpm dies with cwrun (parent-death signal, from a thread kept locked
// for its life), ends when QEMU disconnects (--terminate), and is
// killed by stop.
func startSwtpm(swtpm, dir string) (*vtpm, error) {
	v := &vtpm{ctrl: filepath.Join(dir, "ctrl.sock"), done: make(chan struct{})}
	os.Remove(v.ctrl)
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(v.done)
		cmd := exec.Command(swtpm, "socket", "--tpm2", "--tpmstate", "dir="+dir,
			"--ctrl", "type=unixio,path="+v.ctrl, "--terminate",
			"--log", "file="+filepath.Join(dir, "swtpm.log"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("starting swtpm: %w", err)
			return
		}
		v.pid = cmd.Process.Pid
		started <- nil
		cmd.Wait() //nolint:errcheck // ends when QEMU hangs up or stop kills it
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		// Only looked at, never connected to: with --terminate, swtpm
		// ends when its first control connection closes.
		if _, err := os.Stat(v.ctrl); err == nil {
			break
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("swtpm exited at start%s", logTail(filepath.Join(dir, "swtpm.log")))
		default:
		}
		if time.Now().After(deadline) {
			v.stop()
			return nil, fmt.Errorf("swtpm did not open its control socket %s within 10 s%s", v.ctrl, logTail(filepath.Join(dir, "swtpm.log")))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return v, nil
}

// stop kills swtpm (its state folder goes with the run folder).
func (v *vtpm) stop() {
	if v == nil {
		return
	}
	select {
	case <-v.done:
		return
	default:
	}
	if v.pid > 0 {
		syscall.Kill(-v.pid, syscall.SIGKILL) //nolint:errcheck // gone already is fine
	}
	<-v.done
}

// guestTPM prepares the TPM of a tpm run: the host's device when one is
// given, else a fresh vTPM in runDir/tpm. stop ends it (nil-safe).
func guestTPM(ctx context.Context, o Options, runDir string) (t *vm.TPM, stop func(), err error) {
	if o.TPMDevice != "" {
		if _, err := os.Stat(o.TPMDevice); err != nil {
			return nil, nil, fmt.Errorf("--tpm %s: %w (a host TPM is usually /dev/tpm0)", o.TPMDevice, err)
		}
		return &vm.TPM{Device: o.TPMDevice}, func() {}, nil
	}
	swtpm, setup, err := swtpmTools()
	if err != nil {
		return nil, nil, err
	}
	caDir := o.TPMCADir
	if caDir == "" {
		caDir = DefaultTPMCADir()
	}
	if _, err := TPMCA(caDir); err != nil {
		return nil, nil, err
	}
	dir := filepath.Join(runDir, "tpm")
	if err := manufactureTPM(ctx, setup, dir, caDir); err != nil {
		return nil, nil, err
	}
	v, err := startSwtpm(swtpm, dir)
	if err != nil {
		return nil, nil, err
	}
	return &vm.TPM{Socket: v.ctrl}, v.stop, nil
}
