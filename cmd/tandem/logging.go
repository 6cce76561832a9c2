package main

import (
	"io"
	"log/slog"

	"github.com/tandemdb/tandem/internal/config"
)

// newLogger builds the process logger from the log section. Tandem never logs
// passwords, and statement text or parameters only at debug level.
func newLogger(c config.Log, w io.Writer) *slog.Logger {
	log, _ := newLevelLogger(c, w)
	return log
}

// newLevelLogger is newLogger with the level as a variable, for a reload
// (SIGHUP) to change.
func newLevelLogger(c config.Log, w io.Writer) (*slog.Logger, *slog.LevelVar) {
	level := new(slog.LevelVar)
	level.Set(logLevel(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), level
	}
	return slog.New(slog.NewTextHandler(w, opts)), level
}

// logLevel parses a validated log.level.
func logLevel(s string) slog.Level {
	var level slog.Level
	_ = level.UnmarshalText([]byte(s))
	return level
}
