# lib.sh - helpers shared by the benchmark scripts (sourced; callers define die).

# free_port: a free port on 127.0.0.1, random in BENCH_PORT_MIN-BENCH_PORT_MAX (default
# 20000-32767, below the kernel's ephemeral range; narrow it where several people share a
# machine), nothing listening there, and not in $TAKEN (" p1 p2 "), to which it is added.
TAKEN=${TAKEN:-" "}
free_port() {
  local p i lo=${BENCH_PORT_MIN:-20000} hi=${BENCH_PORT_MAX:-32767}
  for ((i = 0; i < 200; i++)); do
    p=$((lo + RANDOM % (hi - lo + 1)))
    [[ "$TAKEN" != *" $p "* ]] || continue
    if ! (: </dev/tcp/127.0.0.1/$p) 2>/dev/null; then TAKEN+="$p "; echo "$p"; return; fi
  done
  die "no free port found"
}

# percentiles PREFIX: "p50,p99" (nearest rank, in ms) of the latencies in the pgbench --log
# files PREFIX.*; "," when there are none.
percentiles() {
  cat "$1".* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print ","; exit }
      i50 = int(0.50 * NR + 0.999999); i99 = int(0.99 * NR + 0.999999)
      printf "%.3f,%.3f\n", v[i50] / 1000, v[i99] / 1000
    }'
}
