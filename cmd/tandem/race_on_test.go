//go:build race

package main

// raceEnabled: the race detector slows the proxy several times over.
const raceEnabled = true
