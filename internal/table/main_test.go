package table

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/pgtest"
	"github.com/tandemdb/tandem/internal/pgtest/harness"
)

// oldStore and newStore are one pair of throwaway clusters for the whole
// package; each test creates its own database on both.
var oldStore, newStore *pgtest.Cluster

func TestMain(m *testing.M) {
	os.Exit(harness.Run(m, harness.Clusters(&oldStore, &newStore)))
}

// Hostile identifiers: capitals, spaces and double quotes.
const (
	hostileSchema = `Sch "1"`
	hostileTable  = `Tbl "x" y`
)

var hostile = Name{Schema: hostileSchema, Table: hostileTable}

// stores is one test's database on the old (primary) and new (secondary)
// clusters.
type stores struct {
	t  *testing.T
	db string
}

// newStores creates a fresh database with the same name on both clusters.
func newStores(t *testing.T) *stores {
	t.Helper()
	return &stores{t: t, db: harness.NewDBs(t, "", oldStore, newStore)}
}

func (s *stores) connect(c *pgtest.Cluster) *pgx.Conn {
	s.t.Helper()
	return harness.Connect(s.t, c, s.db)
}

func (s *stores) primary() *pgx.Conn   { return s.connect(oldStore) }
func (s *stores) secondary() *pgx.Conn { return s.connect(newStore) }

// both runs sql on both stores.
func (s *stores) both(sql string) {
	s.t.Helper()
	s.old(sql)
	s.new(sql)
}

func (s *stores) old(sql string) {
	s.t.Helper()
	if err := oldStore.Exec(context.Background(), s.db, sql); err != nil {
		s.t.Fatal(err)
	}
}

func (s *stores) new(sql string) {
	s.t.Helper()
	if err := newStore.Exec(context.Background(), s.db, sql); err != nil {
		s.t.Fatal(err)
	}
}

// hash is an independent fingerprint of a table's contents: every row as
// text, in the order given.
func hash(t *testing.T, q Querier, n Name, orderBy string) (string, int) {
	t.Helper()
	var h *string
	var count int
	err := q.QueryRow(context.Background(), fmt.Sprintf(
		"SELECT md5(string_agg(r::text, '|' ORDER BY %s)), count(*) FROM %s r", orderBy, n.Quoted())).Scan(&h, &count)
	if err != nil {
		t.Fatal(err)
	}
	if h == nil {
		return "", 0
	}
	return *h, count
}

// sameTable fails the test unless n holds the same rows on both stores.
func sameTable(t *testing.T, primary, secondary Querier, n Name, orderBy string) int {
	t.Helper()
	hp, np := hash(t, primary, n, orderBy)
	hs, ns := hash(t, secondary, n, orderBy)
	if hp != hs || np != ns {
		t.Fatalf("%s differs: primary %d rows %s, secondary %d rows %s", n, np, hp, ns, hs)
	}
	return np
}

// waitBlocked waits until the backend with pid waits for a lock that the
// backend blocker holds.
func waitBlocked(t *testing.T, q Querier, pid, blocker uint32) {
	t.Helper()
	harness.SucceedsSoon(t, 10*time.Second, func() error {
		var blocked bool
		if err := q.QueryRow(context.Background(), "SELECT $2::int = ANY(pg_blocking_pids($1))", int(pid), int(blocker)).Scan(&blocked); err != nil {
			return err
		}
		if !blocked {
			return fmt.Errorf("backend %d is not blocked by %d", pid, blocker)
		}
		return nil
	})
}
