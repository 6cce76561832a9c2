package config

import (
	"slices"
	"testing"
	"time"
)

// TestReloadableSettings: TakeReloadable takes exactly the settings
// Reloadable lists, and RestartOnly names exactly the rest, so the list
// and the copy cannot drift apart.
func TestReloadableSettings(t *testing.T) {
	a := Default()
	a.Old.DSN = "postgres://u@127.0.0.1:1/a"
	b := a
	// Change every setting: b differs from a in every leaf.
	b.Listen, b.Admin = "127.0.0.1:1", "127.0.0.1:2"
	b.Old = Store{DSN: "postgres://u@127.0.0.1:2/b", PasswordFile: "p"}
	b.New = Store{DSN: "postgres://u@127.0.0.1:3/c", PasswordFile: "q"}
	b.Auth = Auth{Method: AuthSCRAMSHA256, Userlist: "u"}
	b.TLS = TLS{Cert: "c", Key: "k", Require: true}
	b.Limits = Limits{MaxClientSessions: 7, MaxMessageBytes: 9 * KiB, ConnectTimeout: Duration(time.Second),
		IdleSessionTimeout: Duration(time.Minute), DrainTimeout: Duration(time.Hour)}
	b.Relay.Engine = RelayGoroutines
	b.Control = Control{DSN: "postgres://u@127.0.0.1:4/d", PasswordFile: "r"}
	b.Routing = Routing{ReplicaID: "x", MirrorBudget: 1, BreakerFailures: 1, BreakerOpen: 1, Poll: 1, FenceTimeout: 1,
		SequenceMargin: 1, RepairInterval: 1, RepairBackoffMax: 1, DriftStuckAttempts: 1}
	b.Shadow = Shadow{Queue: 1, Workers: 1, MaxResultBytes: 1, Timeout: 1, Settle: 1, FloatTolerance: 1, AA: true, RecordValues: true}
	b.Gates = Gates{VerifyMaxAge: 1, ShadowWindow: 1, ShadowMaxMismatchRate: 1}
	b.Log = Log{Format: LogJSON, Level: LogDebug}
	b.Tables = Tables{Include: []string{"x.*"}}

	all := Changed(&a, &b)
	restart := RestartOnly(&a, &b)
	if len(all) < 30 || len(restart) == 0 || len(restart) == len(all) {
		t.Fatalf("changed %d settings, %d restart-only: %v", len(all), len(restart), restart)
	}
	took := TakeReloadable(&a, &b)
	// What still differs from b after the reload is exactly what needs a restart.
	if left := Changed(took, &b); !slices.Equal(left, restart) {
		t.Errorf("after TakeReloadable, differing from the file: %v\nrestart-only: %v", left, restart)
	}
	for _, p := range all {
		taken := !slices.Contains(Changed(took, &b), p)
		if taken != Reloadable(p) {
			t.Errorf("%s: taken by TakeReloadable %v, Reloadable %v", p, taken, Reloadable(p))
		}
	}
	for _, p := range []string{"listen", "old.dsn", "relay.engine", "routing.replica_id", "shadow.workers", "log.format"} {
		if !slices.Contains(restart, p) {
			t.Errorf("%s is not restart-only", p)
		}
	}
	for _, p := range []string{"auth.userlist", "tls.cert", "limits.max_client_sessions", "log.level", "shadow.aa"} {
		if slices.Contains(restart, p) {
			t.Errorf("%s should reload", p)
		}
	}
	if a.Listen == took.Listen && took.Auth != b.Auth {
		t.Error("TakeReloadable did not take auth")
	}
}
