package admin

import "time"

// Feed is the change feed's state as GET /api/v1/state and `tandem route
// show` report it (design section 10).
type Feed struct {
	Enabled bool         `json:"enabled"` // feed.enabled: flips wait for it and its gate refuses when it is down or behind
	Stores  []FeedStatus `json:"stores"`  // each store with a row in tandem.feed or a feed slot, old first
}

// FeedStatus is the change feed on one store: its row in tandem.feed and
// its slot in the store's pg_replication_slots.
type FeedStatus struct {
	Store       string     `json:"store"`   // the store whose WAL is read
	Primary     bool       `json:"primary"` // it is the primary: the feed should be reading it
	Slot        string     `json:"slot"`
	Holder      string     `json:"holder"`               // the replica running the feed; "" = nobody
	Live        bool       `json:"live"`                 // a holder with a heartbeat within route.FeedLive
	CheckedLSN  string     `json:"checked_lsn"`          // every change committed up to here is checked
	CheckedAt   *time.Time `json:"checked_at"`           // when it last advanced or was confirmed
	HeartbeatAt *time.Time `json:"heartbeat_at"`         // null when tandem.feed has no row for the store
	LastError   string     `json:"last_error,omitempty"` // the feed's last error
	CurrentLSN  string     `json:"current_lsn"`          // the store's WAL position now
	LagBytes    *int64     `json:"lag_bytes"`            // current_lsn - checked_lsn
	LagSeconds  *float64   `json:"lag_seconds"`          // now - checked_at
	SlotExists  bool       `json:"slot_exists"`
	SlotActive  bool       `json:"slot_active"`           // a walsender is streaming from it
	Retained    *int64     `json:"retained_bytes"`        // WAL the slot holds on the store: current_lsn - restart_lsn
	StoreError  string     `json:"store_error,omitempty"` // the store could not be read
}
