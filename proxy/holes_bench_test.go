package proxy

import (
	"context"
	"testing"

	"github.com/tandemdb/tandem/internal/route"
)

// BenchmarkMirrorAutocommit: one autocommit INSERT, UPDATE and DELETE per
// iteration through the proxy with mirror on, on a table no foreign key
// references ("plain": the common case, which must not pay for the
// foreign-key handling) and on a parent whose child has ON DELETE CASCADE.
func BenchmarkMirrorAutocommit(b *testing.B) {
	for _, tc := range []struct{ name, setup string }{
		{"plain", `CREATE TABLE bw (id int PRIMARY KEY, v int)`},
		{"fk_actions", `CREATE TABLE bw (id int PRIMARY KEY, v int); CREATE TABLE bwc (id int PRIMARY KEY, pid int REFERENCES bw ON DELETE CASCADE)`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			e := newPairEnv(b, tc.setup)
			e.set(route.Settings{Primary: route.Old, Mirror: true})
			c := e.client()
			ctx := context.Background()
			b.ResetTimer()
			for i := range b.N {
				if _, err := c.Exec(ctx, `INSERT INTO bw VALUES ($1, 0)`, i); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Exec(ctx, `UPDATE bw SET v = v + 1 WHERE id = $1`, i); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Exec(ctx, `DELETE FROM bw WHERE id = $1`, i); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
