# Sourced by scripts/gpu-check.sh and scripts/gpu-bench.sh: time limits under a deadline.
# TUNELOOP_DEADLINE, when set, is a time in seconds since the epoch (scripts/gpu-all.sh
# sets one for each script, so that a step that hangs on the GPU cannot take the time of
# the steps after it).

# The seconds a step may run: its own limit $1, or what is left before the deadline if
# that is less (at least 1: `timeout 0` would mean no limit).
limit() {
    local want=$1
    if [[ -n ${TUNELOOP_DEADLINE:-} ]]; then
        local left=$((TUNELOOP_DEADLINE - $(date +%s)))
        ((left < want)) && want=$left
    fi
    echo $((want > 1 ? want : 1))
}

# Whether the deadline has passed (or has less than 5 seconds to go).
out_of_time() {
    [[ -n ${TUNELOOP_DEADLINE:-} ]] && (($(date +%s) + 5 >= TUNELOOP_DEADLINE))
}
