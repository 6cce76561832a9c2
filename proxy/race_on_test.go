//go:build race

package proxy

// raceEnabled: the race detector slows the statement classifier (cgo and
// protobuf) by an order of magnitude.
const raceEnabled = true
