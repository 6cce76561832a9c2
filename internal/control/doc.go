// Package control is Tandem's control plane as a library: what a proxy with
// a new store runs next to its server (Open, Plane.Start: the routing-state
// follower, the open-drift refresher, the drift repairer, the mapping
// refresh, the shadow counts, the backfill metrics and the change feed's
// runner), every cutover gate with its one reason type (CutoverGates,
// DriftGates), the flip's feed and sequence steps, and the routing facade
// (Routing) that both the CLI and the admin API's handlers use.
//
// It never imports the proxy: the proxy is a Server. cmd/tandem wires it
// (flags, output); internal/admin serves it over HTTP.
package control
