package tdx

import (
	"encoding/hex"
	"os"
	"testing"
)

// Trustee's own tests replay CCEL_data_ovmf (an OVMF boot) to these.
var ovmfRTMRs = [4]string{
	"8566f998798db09443b244c62de9a3041fb02e2e6936c4396d784bba2e90177329ec5aba3bb484404f2ab9cc90abe193",
	"775b9f6bfe99f8a31396f0d0218e67ffa796d3b96ccf961cbb0deba48c79c00f082cda1a5567c1c16305f1fc210c13c6",
	"94eaf7a7bf398ed8d888c91057ae0261802e4f3df084213a76ca7f0b5055ac9d2241de43cd58d9e8b49c503bbf25f34a",
	"000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
}

func TestReplayOVMFEventLog(t *testing.T) {
	data, err := os.ReadFile("testdata/CCEL_data_ovmf")
	if err != nil {
		t.Fatal(err)
	}
	log, err := replayEventLog(data)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range ovmfRTMRs {
		if got := hex.EncodeToString(log.RTMR[i][:]); got != want {
			t.Errorf("RTMR%d = %s, want %s", i, got, want)
		}
	}
	if log.Extended != [4]bool{true, true, true, false} {
		t.Errorf("extended RTMRs %v, want 0-2", log.Extended)
	}
	t.Logf("%d events", log.Events)
}
