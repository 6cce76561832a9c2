// Package version says which build of Tandem is running: the release
// version stamped at link time, the VCS commit the Go toolchain recorded,
// and the Go version. `tandem version`, the tandem_build_info metric and the
// OpenTelemetry resource all read it from here.
package version

import (
	"runtime"
	"runtime/debug"
)

// Info describes one build.
type Info struct {
	Version   string `json:"version"`    // release version, "dev" for a local build
	Commit    string `json:"commit"`     // VCS revision, "unknown" without VCS stamping
	Modified  bool   `json:"modified"`   // the work tree had uncommitted changes
	GoVersion string `json:"go_version"` // the toolchain that built it
}

// Get returns the build's description; release is the version stamped at
// link time (-ldflags "-X main.version=...").
func Get(release string) Info {
	in := Info{Version: release, Commit: "unknown", GoVersion: runtime.Version()}
	if in.Version == "" {
		in.Version = "dev"
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return in
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Commit = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// Short is the commit shortened to 12 characters, as git prints it.
func (in Info) Short() string {
	if len(in.Commit) > 12 {
		return in.Commit[:12]
	}
	return in.Commit
}
