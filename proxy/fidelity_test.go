package proxy

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/tandemdb/tandem/internal/route"
)

// TestRoutedLargeBothWays: a pipeline whose first statement returns a
// large reply while the client is still writing a large Bind must not
// deadlock or end the session, in every routed phase.
func TestRoutedLargeBothWays(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE blobs (id int PRIMARY KEY, v text)`, generousBudget)
	ctx := context.Background()
	big := strings.Repeat("0123456789abcdef", 8<<20/16) // 8 MiB, far more than the socket buffers
	for i, ph := range routedPhases {
		t.Run(ph.name, func(t *testing.T) {
			e.set(ph.set)
			c := e.client()
			b := &pgx.Batch{}
			var n int
			b.Queue(`SELECT repeat('x', 8388608) AS big`).QueryRow(func(r pgx.Row) error {
				var s string
				if err := r.Scan(&s); err != nil {
					return err
				}
				n = len(s)
				return nil
			})
			b.Queue(`INSERT INTO blobs VALUES ($1, $2)`, i, big)
			b.Queue(`SELECT length(v) FROM blobs WHERE id = $1`, i)
			ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			if err := c.SendBatch(ctx, b).Close(); err != nil {
				t.Fatalf("batch: %v", err)
			}
			if n != 8388608 {
				t.Fatalf("read %d bytes", n)
			}
			var l int
			if err := c.QueryRow(ctx, `SELECT length(v) FROM blobs WHERE id = $1`, i).Scan(&l); err != nil || l != len(big) {
				t.Fatalf("stored %d bytes (%v)", l, err)
			}
		})
	}
	e.set(route.Settings{Primary: route.Old, Mirror: true})
	repairDrift(t, e)
	e.assertEqual("blobs", "id")
}

// TestRoutedCopyFromFails: a COPY FROM that the server rejects midway
// returns the server's error at once, as it does directly, and leaves no
// rows on either store.
func TestRoutedCopyFromFails(t *testing.T) {
	e := newPairEnv(t, `CREATE TABLE nums (id int PRIMARY KEY, v int NOT NULL)`)
	ctx := context.Background()
	const total = 3000000
	pulled := 0
	rows := func() pgx.CopyFromSource {
		i := 0
		pulled = 0
		return pgx.CopyFromFunc(func() ([]any, error) {
			i++
			pulled = i
			if i > total {
				return nil, nil
			}
			if i == 10 {
				return []any{i, nil}, nil // NOT NULL fails here
			}
			return []any{i, i}, nil
		})
	}
	timeCopy := func(c *pgx.Conn) (time.Duration, error) {
		start := time.Now()
		_, err := c.CopyFrom(ctx, pgx.Identifier{"nums"}, []string{"id", "v"}, rows())
		return time.Since(start), err
	}
	direct, err := pgx.Connect(ctx, e.old.DSN(e.db))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(ctx)
	base, err := timeCopy(direct)
	if sqlState(err) != "23502" {
		t.Fatalf("direct: want a not-null violation, got %v", err)
	}
	basePulled := pulled
	for _, ph := range routedPhases {
		t.Run(ph.name, func(t *testing.T) {
			e.set(ph.set)
			c := e.client()
			took, err := timeCopy(c)
			if sqlState(err) != "23502" {
				t.Fatalf("want a not-null violation, got %v", err)
			}
			// The client learns of the error while it is still sending,
			// as it does directly, and stops: it never sends the rest.
			t.Logf("failed COPY: %v and %d rows sent through Tandem, %v and %d rows directly", took, pulled, base, basePulled)
			if pulled > total/2 {
				t.Fatalf("the client sent %d of %d rows before it saw the error (directly: %d)", pulled, total, basePulled)
			}
			var n int
			if err := c.QueryRow(ctx, `SELECT count(*) FROM nums`).Scan(&n); err != nil || n != 0 {
				t.Fatalf("%d rows after a failed COPY (%v)", n, err)
			}
		})
	}
	e.assertEqual("nums", "id")
}
