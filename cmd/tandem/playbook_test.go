package main

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestPlaybookStepsAgree: the README's playbook table and the help texts
// name the same steps with the same numbers: route's examples walk the
// table's steps by their titles, and a command whose help says "playbook
// step N" is one the table's row N runs.
func TestPlaybookStepsAgree(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| ([0-9])\\. ([^|]+?) \\|(?:[^|]*\\|){4} ([^|]+) \\|")
	titles, commands := map[int]string{}, map[int]string{}
	for _, m := range row.FindAllStringSubmatch(string(readme), -1) {
		n, _ := strconv.Atoi(m[1])
		titles[n], commands[n] = m[2], m[3]
	}
	if len(titles) != 5 {
		t.Fatalf("README's playbook table: %d numbered steps found, want 5: %v", len(titles), titles)
	}
	for n := 1; n <= 5; n++ {
		if want := "# " + strconv.Itoa(n) + ". " + titles[n]; !strings.Contains(routeExamples, want) {
			t.Errorf("tandem route's examples lack %q (README's step %d)", want, n)
		}
	}
	step := regexp.MustCompile(`playbook step ([0-9])|step ([0-9]) of the playbook`)
	root := newRoot()
	for _, name := range []string{"plan", "backfill", "compare", "complete", "status"} {
		cmd, _, err := root.Find([]string{name})
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range step.FindAllStringSubmatch(cmd.Long, -1) {
			n, _ := strconv.Atoi(m[1] + m[2])
			if !strings.Contains(commands[n], "tandem "+name) {
				t.Errorf("tandem %s --help says %q, but README's step %d runs %q", name, m[0], n, commands[n])
			}
		}
	}
	// route set --shadow's help says what shadow reads do today.
	set, _, _ := root.Find([]string{"route", "set"})
	if u := set.Flags().Lookup("shadow").Usage; strings.Contains(u, "comes with") || !strings.Contains(u, "compared") {
		t.Errorf("route set --shadow help is out of date: %q", u)
	}
}
