package proxy

import (
	"context"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tandemdb/tandem/internal/table"
)

// catalog reads table metadata from one database of one store, on a small
// pool of its own (the store's DSN user, the session's database), and
// caches it until DDL invalidates it.
type catalog struct {
	pool  *pgxpool.Pool
	cache *table.Cache
	fks   fkCache // foreign keys with referential actions (fk.go)
}

type catalogKey struct{ store, database string }

type catalogs struct {
	mu sync.Mutex
	m  map[catalogKey]*catalog
}

// catalogFor returns the catalog of database on st.
func (s *Server) catalogFor(ctx context.Context, st *store, database string) (*catalog, error) {
	database = st.databaseFor(database)
	s.cats.mu.Lock()
	defer s.cats.mu.Unlock()
	k := catalogKey{st.name, database}
	if c, ok := s.cats.m[k]; ok {
		return c, nil
	}
	pc, err := pgxpool.ParseConfig("")
	if err != nil {
		return nil, err
	}
	pc.ConnConfig.Config = *st.cfg.Copy()
	if database != "" {
		pc.ConnConfig.Database = database
	}
	if pc.ConnConfig.Password == "" && st.passfile != nil {
		pc.ConnConfig.Password = st.passfile.FindPassword(pc.ConnConfig.Host, fmt.Sprint(pc.ConnConfig.Port), pc.ConnConfig.Database, pc.ConnConfig.User)
	}
	pc.MaxConns = 4
	if pc.ConnConfig.RuntimeParams == nil {
		pc.ConnConfig.RuntimeParams = map[string]string{}
	}
	pc.ConnConfig.RuntimeParams["application_name"] = "tandem catalog"
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, err
	}
	if s.cats.m == nil {
		s.cats.m = map[catalogKey]*catalog{}
	}
	c := &catalog{pool: pool, cache: table.NewCache()}
	s.cats.m[k] = c
	return c, nil
}

// invalidateCatalogs drops cached metadata after DDL.
func (s *Server) invalidateCatalogs() {
	s.oids.invalidate()
	s.cats.mu.Lock()
	defer s.cats.mu.Unlock()
	for _, c := range s.cats.m {
		c.cache.Invalidate()
		c.fks.invalidate()
	}
}

// closeCatalogs closes the pools.
func (s *Server) closeCatalogs() {
	s.cats.mu.Lock()
	defer s.cats.mu.Unlock()
	for k, c := range s.cats.m {
		c.pool.Close()
		delete(s.cats.m, k)
	}
}
