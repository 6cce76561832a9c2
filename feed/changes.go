package feed

import (
	"time"

	"github.com/jackc/pglogrepl"
)

// change is one key changed in a batch, with the commit time of the first
// transaction that changed it.
type change struct {
	key []string
	at  time.Time
}

// changes are the keys of one transaction or of a batch of them.
type changes struct {
	keys  map[uint32]map[string]change
	whole map[uint32]wholeChange // relations truncated, or whose keys are not checked one by one
	end   pglogrepl.LSN          // end of the last transaction in it
	last  time.Time              // commit time of the last transaction in it
	first time.Time              // when the batch's first transaction arrived
	recv  time.Time              // when its last transaction arrived
	n     int
}

// wholeChange is a table changed as a whole: truncated, or with keys that
// cannot be read or are too many to hold.
type wholeChange struct {
	at       time.Time
	truncate bool // only a truncate: equal when the secondary's table is empty too
}

// maxKeys is the most keys of one table one transaction (or batch) keeps
// in memory; past it the table is recorded as whole-table drift, and the
// repairer copies it, rather than the feed holding an unbounded set.
const maxKeys = 1 << 20

func (c *changes) reset() { *c = changes{} }

func (c *changes) add(rel uint32, key []string, at time.Time) {
	if w, ok := c.whole[rel]; ok && !w.truncate {
		return // the whole table is recorded anyway
	}
	if c.keys == nil {
		c.keys = map[uint32]map[string]change{}
	}
	m := c.keys[rel]
	if m == nil {
		m = map[string]change{}
		c.keys[rel] = m
	}
	k := joinKey(key)
	if _, ok := m[k]; !ok {
		m[k] = change{key: key, at: at}
		c.n++
	}
	if len(m) > maxKeys {
		c.addWhole(rel, at, false)
		c.n -= len(m)
		delete(c.keys, rel)
	}
}

// addWhole marks table rel changed as a whole; truncate says it was only
// truncated (a later unreadable key makes it a plain whole-table change).
func (c *changes) addWhole(rel uint32, at time.Time, truncate bool) {
	if c.whole == nil {
		c.whole = map[uint32]wholeChange{}
	}
	w, ok := c.whole[rel]
	if !ok {
		c.whole[rel] = wholeChange{at: at, truncate: truncate}
		c.n++
		return
	}
	if !truncate && w.truncate {
		w.truncate = false
		c.whole[rel] = w
	}
}

// merge adds the committed transaction t to the batch c.
func (c *changes) merge(t *changes) {
	if c.n == 0 {
		c.first = time.Now()
	}
	for rel, m := range t.keys {
		for _, ch := range m {
			c.add(rel, ch.key, ch.at)
		}
	}
	for rel, w := range t.whole {
		c.addWhole(rel, w.at, w.truncate)
	}
	c.end, c.last = t.end, t.last
}
