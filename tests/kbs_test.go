package tests

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/config"
	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/cwrun/cwrun/attest/sample"
)

// broker is a `cwrun kbs serve` child process.
type broker struct {
	dir  string // its config folder, made by `cwrun kbs init`
	url  string // https://127.0.0.1:PORT
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs bytes.Buffer
	done chan struct{} // closed when the process has exited
	// killed is set before SIGKILL is sent: errors after it are expected.
	killed atomic.Bool
}

// kbsInit runs `cwrun kbs init` into a new folder.
func kbsInit(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "kbs")
	out := mustRun(t, cwrunBin, "kbs", "init", "--dir", dir)
	for _, want := range []string{config.FileName, config.TokenKeyFile, config.SecretsKeyFile, config.AdminKeyFile,
		config.AdminPubFile, config.TLSCertFile, config.TLSKeyFile, config.CACertFile, config.CAKeyFile, "cwrun kbs serve --config", "cwrun kbs workload add"} {
		if !strings.Contains(out, want) {
			t.Errorf("kbs init output lacks %q:\n%s", want, out)
		}
	}
	return dir
}

var listenRE = regexp.MustCompile(`listen=(https?://[^ ]+)`)

// startBroker serves dir's config on a free port and waits until the
// broker answers /healthz. The process is killed at the test's end.
func startBroker(t *testing.T, dir string, args ...string) *broker {
	t.Helper()
	return startBrokerFor(t, t, dir, args...)
}

// startBrokerFor starts a broker in a subtest t that outlives it: it
// runs until owner (a parent test) ends.
func startBrokerFor(t, owner *testing.T, dir string, args ...string) *broker {
	t.Helper()
	b := &broker{dir: dir, done: make(chan struct{})}
	args = append([]string{"kbs", "serve", "--config", filepath.Join(dir, config.FileName), "--listen", "127.0.0.1:0"}, args...)
	b.cmd = exec.Command(cwrunBin, args...)
	stderr, err := b.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	owner.Cleanup(func() { b.kill(); b.wait() })
	urlc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			b.mu.Lock()
			b.logs.WriteString(line + "\n")
			b.mu.Unlock()
			if m := listenRE.FindStringSubmatch(line); m != nil {
				select {
				case urlc <- m[1]:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() { b.cmd.Wait(); close(b.done) }()
	select {
	case b.url = <-urlc:
	case <-b.done:
		t.Fatalf("kbs serve exited before listening:\n%s", b.log())
	case <-time.After(20 * time.Second):
		t.Fatalf("kbs serve did not log its address in 20 s:\n%s", b.log())
	}
	b.url = strings.Replace(b.url, "127.0.0.1", "localhost", 1) // the certificate's name
	hc := b.httpClient(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := hc.Get(b.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return b
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker at %s not healthy in 10 s (%v):\n%s", b.url, err, b.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (b *broker) log() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.logs.String()
}

func (b *broker) kill() {
	b.killed.Store(true)
	b.cmd.Process.Signal(syscall.SIGKILL)
}

func (b *broker) wait() {
	select {
	case <-b.done:
	case <-time.After(15 * time.Second):
	}
}

func (b *broker) alive() bool {
	select {
	case <-b.done:
		return false
	default:
		return true
	}
}

// httpClient trusts the broker's self-signed certificate.
func (b *broker) httpClient(t *testing.T) *http.Client {
	t.Helper()
	pool, err := config.CertPool(filepath.Join(b.dir, config.TLSCertFile))
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 64,
	}}
}

// admin is the in-process admin client the CLI uses too.
func (b *broker) admin(t *testing.T) *kbs.AdminClient {
	t.Helper()
	c, err := config.NewAdminClient(config.ClientOptions{URL: b.url, Dir: b.dir})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// cli runs an admin verb against b.
func (b *broker) cli(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	args = append(append([]string{}, args...), "--kbs", b.url,
		"--admin-key", filepath.Join(b.dir, config.AdminKeyFile), "--cacert", filepath.Join(b.dir, config.TLSCertFile))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cwrunBin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{out.String(), errb.String(), code}
}

func (b *broker) mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	r := b.cli(t, "", args...)
	if r.code != 0 {
		t.Fatalf("cwrun %s: exit %d\n%s\nbroker log:\n%s", strings.Join(args, " "), r.code, r.stderr, b.log())
	}
	return r.stdout
}

// failCLI runs a verb that must fail and returns its stderr.
func (b *broker) failCLI(t *testing.T, args ...string) string {
	t.Helper()
	r := b.cli(t, "", args...)
	if r.code == 0 {
		t.Fatalf("cwrun %s succeeded, want a failure:\n%s", strings.Join(args, " "), r.stdout)
	}
	return r.stderr
}

func TestKbsInitRefusesOverwrite(t *testing.T) {
	dir := kbsInit(t)
	before, _ := os.ReadFile(filepath.Join(dir, config.SecretsKeyFile))
	r := run(t, time.Minute, cwrunBin, "kbs", "init", "--dir", dir)
	if r.code == 0 || !strings.Contains(r.stderr, "--force") {
		t.Fatalf("second kbs init: exit %d, stderr %q: want a refusal pointing at --force", r.code, r.stderr)
	}
	after, _ := os.ReadFile(filepath.Join(dir, config.SecretsKeyFile))
	if !bytes.Equal(before, after) {
		t.Fatal("a refused init changed secrets.key")
	}
	// A key others can read is refused at serve, with the fix.
	os.Chmod(filepath.Join(dir, config.TokenKeyFile), 0o644)
	r = run(t, time.Minute, cwrunBin, "kbs", "serve", "--config", filepath.Join(dir, config.FileName))
	if r.code == 0 || !strings.Contains(r.stderr, "chmod 600") {
		t.Fatalf("serve with a 0644 token key: exit %d, stderr %q: want a refusal with a chmod hint", r.code, r.stderr)
	}
	// Plain HTTP needs saying so, and then warns.
	os.Chmod(filepath.Join(dir, config.TokenKeyFile), 0o600)
	b := startBroker(t, dir, "--insecure-http", "--tees", "sample")
	if !strings.HasPrefix(b.url, "http://") || !strings.Contains(b.log(), "PLAIN HTTP") {
		t.Errorf("--insecure-http: url %s, log:\n%s", b.url, b.log())
	}
}

// A running broker takes `cwrun kbs renew-tls`'s new pair without a
// restart, and clients given init's ca.crt or tls.crt keep trusting it;
// after `renew-tls --new-ca` only those given the new ca.crt do.
func TestKbsRenewTLS(t *testing.T) {
	dir := kbsInit(t)
	b := startBroker(t, dir, "--tees", "sample")
	byCA, byTLS := clientTrusting(t, filepath.Join(dir, config.CACertFile)), b.httpClient(t)
	before := peerCert(t, byCA, b.url)
	out := mustRun(t, cwrunBin, "kbs", "renew-tls", "--dir", dir)
	if !strings.Contains(out, "renewed") || !strings.Contains(out, "need nothing new") {
		t.Errorf("renew-tls output:\n%s", out)
	}
	// The broker looks at the files once a second at most.
	deadline := time.Now().Add(10 * time.Second)
	for peerCert(t, byCA, b.url).Equal(before) {
		if time.Now().After(deadline) {
			t.Fatalf("the broker still serves the old certificate 10 s after renew-tls\nbroker log:\n%s", b.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if c := peerCert(t, byTLS, b.url); c.Equal(before) {
		t.Error("a client given init's tls.crt was served the old certificate")
	}
	if !strings.Contains(b.log(), "TLS certificate reloaded") {
		t.Errorf("the broker did not log the reload:\n%s", b.log())
	}

	// A new CA: the old trust ends, the new ca.crt's begins.
	renewed := peerCert(t, byCA, b.url)
	out = mustRun(t, cwrunBin, "kbs", "renew-tls", "--dir", dir, "--new-ca")
	if !strings.Contains(out, "NEW CA") {
		t.Errorf("renew-tls --new-ca output:\n%s", out)
	}
	fresh := clientTrusting(t, filepath.Join(dir, config.CACertFile))
	deadline = time.Now().Add(10 * time.Second)
	for {
		resp, err := fresh.Get(b.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a client with the new ca.crt is still refused 10 s on: %v\nbroker log:\n%s", err, b.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	byCA.Transport.(*http.Transport).CloseIdleConnections()
	if _, err := byCA.Get(b.url + "/healthz"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client with the old ca.crt: %v; want a certificate error (was served %v before)", err, renewed.SerialNumber)
	}
}

// `cwrun kbs check` looks a setup over beside its running broker, and
// fails on what would stop serve.
func TestKbsCheck(t *testing.T) {
	dir := kbsInit(t)
	cfg := filepath.Join(dir, config.FileName)
	out := mustRun(t, cwrunBin, "kbs", "check", "--config", cfg)
	if !strings.Contains(out, "issued by the broker's CA") || !strings.Contains(out, "does not exist yet") {
		t.Errorf("check of a fresh init:\n%s", out)
	}
	startBroker(t, dir, "--tees", "sample")
	out = mustRun(t, cwrunBin, "kbs", "check", "--config", cfg)
	if !strings.Contains(out, "a broker serves from it now") {
		t.Errorf("check beside a running broker:\n%s", out)
	}
	os.Chmod(filepath.Join(dir, config.SecretsKeyFile), 0o644)
	r := run(t, time.Minute, cwrunBin, "kbs", "check", "--config", cfg)
	if r.code != 1 || !strings.Contains(r.stdout, "FAIL  config  secrets_key") || !strings.Contains(r.stderr, "1 problem") {
		t.Errorf("check with a readable secrets key: exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
}

// Help names each verb as the user types it.
func TestKbsHelpNames(t *testing.T) {
	for _, verb := range [][]string{{"workload", "add"}, {"check"}, {"renew-tls"}, {"rotate-secrets"}, {"reseal"}, {"backup"}, {"restore"}} {
		out := mustRun(t, cwrunBin, append(append([]string{"kbs"}, verb...), "--help")...)
		if want := "cwrun kbs " + strings.Join(verb, " "); !strings.Contains(out, want) {
			t.Errorf("help of %v does not say %q:\n%s", verb, want, out)
		}
	}
}

// clientTrusting is an HTTPS client that trusts the certificates in
// file and nothing else.
func clientTrusting(t *testing.T, file string) *http.Client {
	t.Helper()
	pool, err := config.CertPool(file)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// peerCert is the certificate the broker at url serves c on a new
// connection.
func peerCert(t *testing.T, c *http.Client, url string) *x509.Certificate {
	t.Helper()
	c.Transport.(*http.Transport).CloseIdleConnections()
	resp, err := c.Get(url + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.TLS.PeerCertificates[0]
}

func TestKbsAdminVerbs(t *testing.T) {
	dir := kbsInit(t)
	b := startBroker(t, dir, "--tees", "sample,snp")
	for _, want := range []string{"store=sqlite://" + dir, "tees=sample,snp"} {
		if !strings.Contains(b.log(), want) {
			t.Errorf("serve's log lacks %q:\n%s", want, b.log())
		}
	}
	work := t.TempDir()
	pass := writeKey(t, work, "s3cret-disk-passphrase")

	out := b.mustCLI(t, "kbs", "workload", "add", "app1", "--tee", "snp", "--passphrase-file", pass,
		"--ref", "measurement=aa11", "--ref", "measurement=bb22", "--ref", "policy_debug=false", "--cpus", "2", "--memory", "512")
	if !strings.Contains(out, "app1") {
		t.Errorf("workload add said %q", out)
	}
	r := b.cli(t, "other-passphrase\n", "kbs", "workload", "add", "app2", "--tee", "sample", "--passphrase-stdin")
	if r.code != 0 {
		t.Fatalf("workload add --passphrase-stdin: %s", r.stderr)
	}
	// Never an overwrite, and the broker's reason reaches the user.
	if e := b.failCLI(t, "kbs", "workload", "add", "app1", "--tee", "snp", "--passphrase-file", pass, "--ref", "measurement=cc33"); !strings.Contains(e, "app1") || !strings.Contains(strings.ToLower(e), "exist") {
		t.Errorf("re-adding app1: %q, want the broker's 'exists' reason", e)
	}
	if e := b.failCLI(t, "kbs", "workload", "add", "app3", "--tee", "snp"); !strings.Contains(e, "--passphrase-file") {
		t.Errorf("add without a passphrase: %q", e)
	}

	list := b.mustCLI(t, "kbs", "workload", "list")
	if !regexp.MustCompile(`(?m)^app1\s+snp\s+measurement,policy_debug\s+no\s+2\s+512 MiB`).MatchString(list) ||
		!regexp.MustCompile(`(?m)^app2\s+sample\s`).MatchString(list) {
		t.Errorf("workload list:\n%s", list)
	}
	var infos []kbs.WorkloadInfo
	if err := json.Unmarshal([]byte(b.mustCLI(t, "kbs", "workload", "list", "--format", "json")), &infos); err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].ID != "app1" || len(infos[0].References["measurement"]) != 2 {
		t.Errorf("workload list --format json: %+v", infos)
	}
	show := b.mustCLI(t, "kbs", "workload", "show", "app1")
	if !strings.Contains(show, "measurement = aa11 | bb22") || strings.Contains(show, "s3cret") {
		t.Errorf("workload show:\n%s", show)
	}
	if e := b.failCLI(t, "kbs", "workload", "show", "nope"); !strings.Contains(e, "nope") {
		t.Errorf("show of a missing workload: %q", e)
	}

	// A replace keeps what it is not given, says so, and never loosens
	// the workload by leaving something out.
	allow := filepath.Join(work, "allow.rego")
	os.WriteFile(allow, []byte("package policy\nimport rego.v1\ndefault allow := true\n"), 0o600)
	r = b.cli(t, "", "kbs", "workload", "add", "app1", "--replace", "--tee", "snp", "--policy-file", allow)
	if r.code != 0 || !strings.Contains(r.stderr, "kept workload app1's passphrase, reference values (3), cpus, memory") {
		t.Errorf("replace with a policy only: exit %d, stderr %q", r.code, r.stderr)
	}
	r = b.cli(t, "", "kbs", "workload", "add", "app1", "--replace", "--tee", "snp", "--ref", "measurement=cc33")
	if r.code != 0 || !strings.Contains(r.stderr, "policy") {
		t.Errorf("replace with references only: exit %d, stderr %q", r.code, r.stderr)
	}
	if show := b.mustCLI(t, "kbs", "workload", "show", "app1"); !strings.Contains(show, "measurement = cc33") || strings.Contains(show, "aa11") || !strings.Contains(show, "default allow := true") {
		t.Errorf("after replacing the references, the policy kept:\n%s", show)
	}
	b.mustCLI(t, "kbs", "workload", "add", "app1", "--replace", "--tee", "snp", "--no-policy")
	if show := b.mustCLI(t, "kbs", "workload", "show", "app1"); strings.Contains(show, "default allow") || !strings.Contains(show, "measurement = cc33") {
		t.Errorf("after --no-policy:\n%s", show)
	}
	// Another TEE keeps none of the old claims: its anchor must be given.
	if e := b.failCLI(t, "kbs", "workload", "add", "app1", "--replace", "--tee", "tdx"); !strings.Contains(e, "reference value for mr_td") {
		t.Errorf("replace with another TEE and no references: %q", e)
	}
	// Dropping the anchor claim is refused, by the broker.
	if e := b.failCLI(t, "kbs", "workload", "add", "app1", "--replace", "--tee", "snp", "--ref", "policy_debug=false"); !strings.Contains(e, "no guest ever gets its key") {
		t.Errorf("replace without the measurement: %q", e)
	}

	// Resources round-trip, from a file and from stdin.
	res := filepath.Join(work, "res")
	os.WriteFile(res, []byte("resource bytes\x00\xff"), 0o600)
	b.mustCLI(t, "kbs", "resource", "set", "default/key/one", res)
	if got := b.mustCLI(t, "kbs", "resource", "get", "default/key/one"); got != "resource bytes\x00\xff" {
		t.Errorf("resource get: %q", got)
	}
	if r := b.cli(t, "from stdin", "kbs", "resource", "set", "default/key/two", "-"); r.code != 0 {
		t.Fatal(r.stderr)
	}
	got := filepath.Join(work, "got")
	b.mustCLI(t, "kbs", "resource", "get", "default/key/two", "-o", got)
	if g, _ := os.ReadFile(got); string(g) != "from stdin" {
		t.Errorf("resource get -o: %q", g)
	}
	if fi, _ := os.Stat(got); fi.Mode().Perm() != 0o600 {
		t.Errorf("resource get -o made mode %04o, want 0600", fi.Mode().Perm())
	}
	if e := b.failCLI(t, "kbs", "resource", "get", "default/key/none"); !strings.Contains(e, "default/key/none") {
		t.Errorf("get of a missing resource: %q", e)
	}
	if got := b.mustCLI(t, "kbs", "resource", "list"); got != "default/key/one\ndefault/key/two\n" {
		t.Errorf("resource list: %q", got)
	}
	b.mustCLI(t, "kbs", "resource", "rm", "default/key/one")
	if got := b.mustCLI(t, "kbs", "resource", "list"); got != "default/key/two\n" {
		t.Errorf("resource list after rm: %q", got)
	}
	if e := b.failCLI(t, "kbs", "resource", "rm", "default/key/one"); !strings.Contains(e, "default/key/one") {
		t.Errorf("rm of a missing resource: %q", e)
	}

	// Policies round-trip; a broken one is refused with the reason.
	pol := filepath.Join(work, "policy.rego")
	rego := "package policy\n\ndefault allow := false\n\nallow if input.tee == \"sample\"\n"
	os.WriteFile(pol, []byte(rego), 0o644)
	b.mustCLI(t, "kbs", "policy", "set", pol)
	if got := b.mustCLI(t, "kbs", "policy", "get"); got != rego {
		t.Errorf("policy get: %q, want %q", got, rego)
	}
	os.WriteFile(pol, []byte("package policy\nallow if {"), 0o644)
	if e := b.failCLI(t, "kbs", "policy", "set", pol); !strings.Contains(strings.ToLower(e), "rego") && !strings.Contains(e, "parse") {
		t.Errorf("a broken policy: %q, want the parse error", e)
	}

	b.mustCLI(t, "kbs", "workload", "rm", "app2")
	if e := b.failCLI(t, "kbs", "workload", "show", "app2"); !strings.Contains(e, "app2") {
		t.Errorf("show after rm: %q", e)
	}

	// SIGTERM: a graceful stop, exit status 0, the store closed.
	defer func() {
		b.cmd.Process.Signal(syscall.SIGTERM)
		b.wait()
		if b.alive() || b.cmd.ProcessState.ExitCode() != 0 || !strings.Contains(b.log(), "shutting down") {
			t.Errorf("SIGTERM: alive %v, exit %v, log:\n%s", b.alive(), b.cmd.ProcessState, b.log())
		}
	}()

	// Another admin key is refused.
	other := filepath.Join(t.TempDir(), "other")
	mustRun(t, cwrunBin, "kbs", "init", "--dir", other)
	r = run(t, time.Minute, cwrunBin, "kbs", "workload", "list", "--kbs", b.url,
		"--admin-key", filepath.Join(other, config.AdminKeyFile), "--cacert", filepath.Join(dir, config.TLSCertFile))
	if r.code == 0 || !strings.Contains(r.stderr, "401") {
		t.Errorf("list with an unknown admin key: exit %d, %q", r.code, r.stderr)
	}
	// And a broker certificate nobody vouched for.
	r = run(t, time.Minute, cwrunBin, "kbs", "workload", "list", "--kbs", b.url,
		"--admin-key", filepath.Join(dir, config.AdminKeyFile), "--cacert", filepath.Join(other, config.TLSCertFile))
	if r.code == 0 || !strings.Contains(r.stderr, "certificate") {
		t.Errorf("list against an untrusted certificate: exit %d, %q", r.code, r.stderr)
	}
}

func TestKbsSampleHandshake(t *testing.T) {
	dir := kbsInit(t)
	b := startBroker(t, dir, "--tees", "sample")
	ctx := context.Background()
	ad := b.admin(t)
	if _, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: "ok", Tee: attest.TeeSample, Passphrase: "the-disk-key"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: "picky", Tee: attest.TeeSample, Passphrase: "other",
		References: map[string][]string{"svn": {"99"}}}); err != nil {
		t.Fatal(err)
	}
	client := &attest.Client{BaseURL: b.url, HTTP: b.httpClient(t), Attester: sample.NewAttester()}
	got, err := client.Resource(ctx, kbs.PassphrasePath("ok"))
	if err != nil {
		t.Fatalf("sample handshake: %v\nbroker log:\n%s", err, b.log())
	}
	if string(got) != "the-disk-key" {
		t.Fatalf("released %q, want the registered passphrase", got)
	}
	// A reference value mismatch: denied, and the client hears which check.
	_, err = client.Resource(ctx, kbs.PassphrasePath("picky"))
	if err == nil {
		t.Fatal("a guest whose svn is not the reference got the key")
	}
	if !strings.Contains(err.Error(), "svn") {
		t.Errorf("denial %q does not name the failed check (svn)", err)
	}
	if strings.Contains(err.Error(), "other") {
		t.Errorf("denial %q leaks the passphrase", err)
	}
	// A removed workload's key is gone.
	if err := ad.DeleteWorkload(ctx, "ok"); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Resource(ctx, kbs.PassphrasePath("ok")); err == nil {
		t.Fatal("a removed workload's key was released")
	}
}

// TestKbsKill9Durability kills the broker with SIGKILL in the middle of a
// burst of registrations and checks that every registration it
// acknowledged is there after a restart on the same config.
func TestKbsKill9Durability(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { kill9Durability(t) })
	t.Run("postgres", func(t *testing.T) {
		// A real PostgreSQL server; skipped, with the reason, where none runs.
		kill9Durability(t, "--store", pgtest.Start(t).NewDatabase(t))
	})
}

func kill9Durability(t *testing.T, args ...string) {
	dir := kbsInit(t)
	b := startBroker(t, dir, args...)
	acked := registrationBurst(t, b, 400, 60)
	b2 := startBroker(t, dir, args...)
	ws, err := b2.admin(t).Workloads(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, w := range ws {
		have[w.ID] = true
	}
	var lost []string
	for _, id := range acked {
		if !have[id] {
			lost = append(lost, id)
		}
	}
	if len(lost) > 0 {
		t.Fatalf("%d of %d acknowledged registrations lost after kill -9: %v", len(lost), len(acked), lost)
	}
	t.Logf("%d acknowledged before kill -9, %d stored after restart", len(acked), len(ws))
}

// registrationBurst registers up to n workloads from 16 goroutines and
// kills the broker (SIGKILL) once killAfter are acknowledged. It returns
// the acknowledged IDs.
func registrationBurst(t *testing.T, b *broker, n, killAfter int) []string {
	t.Helper()
	ad := b.admin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var (
		mu    sync.Mutex
		acked []string
		wg    sync.WaitGroup
		once  sync.Once
		next  = make(chan int)
	)
	go func() {
		defer close(next)
		for i := 0; i < n; i++ {
			select {
			case next <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				id := fmt.Sprintf("burst-%04d", i)
				_, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: id, Tee: attest.TeeSNP, Passphrase: "p-" + strconv.Itoa(i),
					References: map[string][]string{"measurement": {fmt.Sprintf("%096x", i)}}})
				if err != nil {
					if !b.killed.Load() {
						t.Errorf("registering %s while the broker was up: %v", id, err)
					}
					continue
				}
				mu.Lock()
				acked = append(acked, id)
				if len(acked) >= killAfter {
					once.Do(b.kill)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	once.Do(b.kill) // the burst ended before killAfter acks
	b.wait()
	if b.alive() {
		t.Fatal("broker survived SIGKILL")
	}
	if len(acked) < killAfter {
		t.Fatalf("only %d registrations acknowledged, want at least %d", len(acked), killAfter)
	}
	if len(acked) == n {
		t.Logf("every registration was acknowledged before the kill: the burst was too short to test much")
	}
	return acked
}

// fuzzInputs reads the bodies of the broker's fuzz corpus (Go's
// "go test fuzz v1" files); each []byte or string argument is one body.
func fuzzInputs(t *testing.T) map[string][][]byte {
	t.Helper()
	files, _ := filepath.Glob("../attest/kbs/testdata/fuzz/*/*")
	out := map[string][][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		target := filepath.Base(filepath.Dir(f))
		for _, line := range strings.Split(string(b), "\n")[1:] {
			line = strings.TrimSpace(line)
			for _, pfx := range []string{"[]byte(", "string("} {
				if lit, ok := strings.CutPrefix(line, pfx); ok {
					s, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
					if err != nil {
						t.Fatalf("%s: %v", f, err)
					}
					out[target] = append(out[target], []byte(s))
				}
			}
		}
	}
	// Seeds of our own, so that the test means something without a corpus.
	out["seeds"] = [][]byte{
		nil, []byte("{"), []byte("null"), []byte("[]"), []byte(`{"version":"0.4.0","tee":"sample","extra-params":{}}`),
		[]byte(`{"version":"9","tee":"sample"}`), []byte(`{"version":"0.4.0","tee":"nope"}`),
		[]byte(`{"runtime-data":{"nonce":"x","tee-pubkey":{"kty":"EC"}},"tee-evidence":{"primary_evidence":{"svn":"1"}}}`),
		[]byte(`{"runtime-data":{"nonce":"","tee-pubkey":null},"tee-evidence":{"primary_evidence":"AAAA","additional_evidence":"{"}}`),
		[]byte(`{"id":"","tee":"sample"}`), []byte(`{"id":"x/y","tee":"snp","passphrase":"p"}`),
		[]byte(`{"id":"f","tee":"snp","passphrase":"p","cpus":-1}`), []byte(`{"policy":"!!!"}`),
		[]byte(`{"policy":"cGFja2FnZSBwb2xpY3kKYWxsb3cgaWYgewo="}`),
		bytes.Repeat([]byte("A"), 2<<20), []byte("\x00\xff\xfe"),
	}
	return out
}

// TestKbsFuzzCorpusNo5xx sends every corpus body at every endpoint that
// reads a body, with and without a session or admin token, and checks
// the broker answers 4xx (or 2xx), never 5xx, and stays up.
func TestKbsFuzzCorpusNo5xx(t *testing.T) {
	dir := kbsInit(t)
	b := startBroker(t, dir, "--tees", "sample,snp,tdx", "--allow-register")
	hc := b.httpClient(t)
	key, err := config.ReadPrivateKey(filepath.Join(dir, config.AdminKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := kbs.MintAdminToken(key, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// A session cookie, so that /attest bodies reach the evidence parsers.
	auth := func() []*http.Cookie {
		resp, err := hc.Post(b.url+"/kbs/v0/auth", "application/json",
			strings.NewReader(`{"version":"0.4.0","tee":"sample","extra-params":{}}`))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("/auth: %s", resp.Status)
		}
		return resp.Cookies()
	}
	type endpoint struct {
		method, path string
		admin        bool
		cookie       bool
	}
	endpoints := []endpoint{
		{"POST", "/kbs/v0/auth", false, false},
		{"POST", "/kbs/v0/attest", false, true},
		{"POST", "/kbs/v0/attest", false, false},
		{"POST", "/kbs/v0/register_workload", false, false},
		{"POST", "/kbs/v0/admin/workloads", true, false},
		{"PUT", "/kbs/v0/admin/workloads/fz", true, false},
		{"POST", "/kbs/v0/resource/fz/fz/fz", true, false},
		{"POST", "/kbs/v0/resource-policy", true, false},
		{"POST", "/kbs/v0/key/fz", false, false},
		{"POST", "/kbs/v0/admin/workloads", false, false},
	}
	inputs := fuzzInputs(t)
	sent := 0
	for target, bodies := range inputs {
		for i, body := range bodies {
			for _, ep := range endpoints {
				req, _ := http.NewRequest(ep.method, b.url+ep.path, bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				if ep.admin {
					req.Header.Set("Authorization", "Bearer "+tok)
				}
				if ep.cookie {
					for _, c := range auth() {
						req.AddCookie(c)
					}
				}
				resp, err := hc.Do(req)
				if err != nil {
					t.Fatalf("%s %s with %s[%d]: %v\nbroker log:\n%s", ep.method, ep.path, target, i, err, b.log())
				}
				msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
				resp.Body.Close()
				if resp.StatusCode >= 500 {
					t.Errorf("%s %s with %s[%d] (%.80q): %s %s", ep.method, ep.path, target, i, body, resp.Status, msg)
				}
				sent++
			}
		}
	}
	if !b.alive() {
		t.Fatalf("broker died:\n%s", b.log())
	}
	resp, err := hc.Get(b.url + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("broker unhealthy after the corpus: %v", err)
	}
	resp.Body.Close()
	t.Logf("%d requests from %d corpus groups", sent, len(inputs))
}

// brokerWithSecrets starts a sample broker on a fresh init holding
// workload "one" (passphrase disk-key-1) and resource app/cfg/db
// (resource-1).
func brokerWithSecrets(t *testing.T) (dir string, b *broker) {
	t.Helper()
	dir = kbsInit(t)
	b = startBroker(t, dir, "--tees", "sample")
	ctx := context.Background()
	ad := b.admin(t)
	if _, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: "one", Tee: attest.TeeSample, Passphrase: "disk-key-1"}); err != nil {
		t.Fatal(err)
	}
	if err := ad.SetResource(ctx, "app/cfg/db", []byte("resource-1")); err != nil {
		t.Fatal(err)
	}
	return dir, b
}

// wantReleased checks that a sample guest gets workload id's
// passphrase from b.
func wantReleased(t *testing.T, b *broker, id, want string) {
	t.Helper()
	c := &attest.Client{BaseURL: b.url, HTTP: b.httpClient(t), Attester: sample.NewAttester()}
	got, err := c.Resource(context.Background(), kbs.PassphrasePath(id))
	if err != nil || string(got) != want {
		t.Fatalf("release of %s: %q, %v; want %q\nbroker log:\n%s", id, got, err, want, b.log())
	}
}

// A secrets key rotation as an operator runs it: rotate, restart,
// reseal, drop the old key, restart; every passphrase and resource is
// released throughout, and dropping is refused while the broker still
// seals under the old key.
func TestKbsRotateSecrets(t *testing.T) {
	dir, b := brokerWithSecrets(t)
	cfg := filepath.Join(dir, config.FileName)
	keyFile := filepath.Join(dir, config.SecretsKeyFile)
	ctx := context.Background()

	out := mustRun(t, cwrunBin, "kbs", "rotate-secrets", "--config", cfg)
	if !strings.Contains(out, "1 earlier key(s) kept") || !strings.Contains(out, "cwrun kbs reseal") {
		t.Errorf("rotate-secrets output:\n%s", out)
	}
	rotatedFile, _ := os.ReadFile(keyFile)
	// The broker still runs on the old key: dropping it now would lose
	// every record, and is refused.
	msg := b.failCLI(t, "kbs", "rotate-secrets", "--config", cfg, "--drop-previous")
	if !strings.Contains(msg, "seals under key id") || !strings.Contains(msg, "nothing dropped") {
		t.Errorf("--drop-previous before the restart: %s", msg)
	}
	if now, _ := os.ReadFile(keyFile); !bytes.Equal(now, rotatedFile) {
		t.Fatal("a refused --drop-previous changed the secrets key file")
	}

	b.kill()
	b.wait()
	b = startBroker(t, dir, "--tees", "sample")
	wantReleased(t, b, "one", "disk-key-1") // sealed under the old key
	if _, err := b.admin(t).AddWorkload(ctx, kbs.WorkloadSpec{ID: "two", Tee: attest.TeeSample, Passphrase: "disk-key-2"}); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, cwrunBin, "kbs", "check", "--config", cfg); !strings.Contains(out, "1 earlier key(s)") {
		t.Errorf("check during the rotation:\n%s", out)
	}
	out = b.mustCLI(t, "kbs", "reseal")
	if !strings.Contains(out, "re-sealed 2 record(s)") || !strings.Contains(out, "1 already were") {
		t.Errorf("reseal output:\n%s", out)
	}
	out = b.mustCLI(t, "kbs", "rotate-secrets", "--config", cfg, "--drop-previous")
	if !strings.Contains(out, "every stored record (3)") {
		t.Errorf("--drop-previous output:\n%s", out)
	}
	if sf, err := config.ReadSecretsFile(cfg); err != nil || sf.Previous != 0 {
		t.Fatalf("after --drop-previous: %+v, %v", sf, err)
	}

	b.kill()
	b.wait()
	b = startBroker(t, dir, "--tees", "sample")
	wantReleased(t, b, "one", "disk-key-1")
	wantReleased(t, b, "two", "disk-key-2")
	if got, err := b.admin(t).Resource(ctx, "app/cfg/db"); err != nil || string(got) != "resource-1" {
		t.Errorf("the resource after the rotation: %q, %v", got, err)
	}
	for _, s := range []string{"disk-key-1", "disk-key-2", "resource-1"} {
		if strings.Contains(b.log(), s) {
			t.Errorf("the broker log carries the secret %q", s)
		}
	}
}

// Backup beside a running broker, restore after it stopped: what the
// backup held is released again, what came later is gone (and kept
// aside), and a backup sealed under another secrets key is refused
// before anything changes.
func TestKbsBackupRestore(t *testing.T) {
	dir, b := brokerWithSecrets(t)
	cfg := filepath.Join(dir, config.FileName)
	ctx := context.Background()
	ad := b.admin(t)
	backup := filepath.Join(t.TempDir(), "kbs-backup.db")
	out := mustRun(t, cwrunBin, "kbs", "backup", "--config", cfg, backup)
	if !strings.Contains(out, "1 workload(s), 1 resource(s)") || !strings.Contains(out, "its 2 sealed secret(s) open with") {
		t.Errorf("backup output:\n%s", out)
	}
	// To standard output, for a pipe off the machine; the report on
	// standard error.
	r := run(t, time.Minute, cwrunBin, "kbs", "backup", "--config", cfg, "-")
	if r.code != 0 || !strings.Contains(r.stderr, "backed up") || !strings.HasPrefix(r.stdout, "SQLite format 3\x00") {
		t.Fatalf("backup -: exit %d, %d bytes out\n%s", r.code, len(r.stdout), r.stderr)
	}
	piped := filepath.Join(t.TempDir(), "piped.db")
	os.WriteFile(piped, []byte(r.stdout), 0o600)
	if sum, err := sqlite.Inspect(ctx, piped); err != nil || sum.Workloads != 1 || sum.Resources != 1 {
		t.Errorf("the piped backup: %+v, %v", sum, err)
	}
	if _, err := ad.AddWorkload(ctx, kbs.WorkloadSpec{ID: "later", Tee: attest.TeeSample, Passphrase: "disk-key-2"}); err != nil {
		t.Fatal(err)
	}
	r = run(t, time.Minute, cwrunBin, "kbs", "restore", "--config", cfg, backup)
	if r.code == 0 || !strings.Contains(r.stderr, "a broker is serving") {
		t.Fatalf("restore beside the running broker: exit %d\n%s", r.code, r.stderr)
	}

	// Another broker's backup, sealed under its own secrets key.
	other := kbsInit(t)
	ob := startBroker(t, other, "--tees", "sample")
	if _, err := ob.admin(t).AddWorkload(ctx, kbs.WorkloadSpec{ID: "foreign", Tee: attest.TeeSample, Passphrase: "x"}); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(t.TempDir(), "foreign.db")
	mustRun(t, cwrunBin, "kbs", "backup", "--config", filepath.Join(other, config.FileName), foreign)

	b.kill()
	b.wait()
	r = run(t, time.Minute, cwrunBin, "kbs", "restore", "--config", cfg, foreign)
	if r.code == 0 || !strings.Contains(r.stderr, "open with no key") || !strings.Contains(r.stderr, "nothing changed") {
		t.Fatalf("restore of another broker's backup: exit %d\n%s", r.code, r.stderr)
	}
	out = mustRun(t, cwrunBin, "kbs", "restore", "--config", cfg, backup)
	if !strings.Contains(out, "restored") || !strings.Contains(out, "before-restore-") {
		t.Errorf("restore output:\n%s", out)
	}

	b = startBroker(t, dir, "--tees", "sample")
	wantReleased(t, b, "one", "disk-key-1")
	if got, err := b.admin(t).Resource(ctx, "app/cfg/db"); err != nil || string(got) != "resource-1" {
		t.Errorf("after the restore, the resource: %q, %v", got, err)
	}
	if _, err := b.admin(t).Workload(ctx, "later"); err == nil {
		t.Error("a workload registered after the backup survived its restore")
	}
	aside, _ := filepath.Glob(filepath.Join(dir, "*.before-restore-*"))
	if len(aside) != 1 {
		t.Fatalf("the replaced database was not kept: %v", aside)
	}
	if fi, err := os.Stat(aside[0]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("the kept database: %v, %v", fi, err)
	}
}

// Under systemd (Type=notify) the broker says READY=1 once it listens,
// with its address, and STOPPING=1 when told to stop.
func TestKbsServeNotifiesSystemd(t *testing.T) {
	dir := kbsInit(t)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cmd := exec.Command(cwrunBin, "kbs", "serve", "--config", filepath.Join(dir, config.FileName), "--listen", "127.0.0.1:0", "--tees", "sample")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	msg := func() string {
		t.Helper()
		conn.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 1024)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no sd_notify message: %v\nbroker:\n%s", err, stderr.String())
		}
		return string(buf[:n])
	}
	ready := msg()
	if !strings.HasPrefix(ready, "READY=1\nSTATUS=serving on 127.0.0.1:") {
		t.Fatalf("first message %q, want READY=1 with the address", ready)
	}
	// READY comes once it listens: a client is answered at once.
	addr := strings.TrimPrefix(ready, "READY=1\nSTATUS=serving on ")
	hc := clientTrusting(t, filepath.Join(dir, config.CACertFile))
	resp, err := hc.Get("https://" + strings.Replace(addr, "127.0.0.1", "localhost", 1) + "/healthz")
	if err != nil {
		t.Fatalf("the broker said READY but does not answer: %v", err)
	}
	resp.Body.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	if got := msg(); got != "STOPPING=1" {
		t.Errorf("on SIGTERM: %q, want STOPPING=1", got)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("the broker's exit after SIGTERM: %v\n%s", err, stderr.String())
	}
}
