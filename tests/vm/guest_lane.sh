#!/bin/sh
# Runs as root inside the microVM (started by tests/vm/lane.py through pynsbook.vm):
# sets the guest up as one test lane would find its host, then runs the guest checks
# and pytest. Usage: guest_lane.sh LANE REPO PYTHON [PYTEST ARGS...]
#
#   root       root; the shell sits in a leaf cgroup (as in a session scope), every
#              controller enabled at the root (PYNSBOOK_VM_ROOT_CGROUP=root: stay in /)
#   delegated  an unprivileged user owning /sys/fs/cgroup/lane (as systemd's
#              Delegate=yes), its shell in lane itself, subtree_control empty
#   nouserns   user.max_user_namespaces=0 and an unprivileged user with no writable
#              cgroup (as on Binder-like hosts)
set -u
LANE=$1 REPO=$2 PY=$3
shift 3
CG=/sys/fs/cgroup
LANE_USER=pynsbook-lane
LANE_UID=4242

add_user() {
    # The host's /etc is read-only here: lay copies with one more user over it.
    mkdir -p /run/lane-etc
    cp /etc/passwd /etc/group /run/lane-etc/
    echo "$LANE_USER:x:$LANE_UID:$LANE_UID:pynsbook VM lane:/tmp/lane-home:/bin/sh" >> /run/lane-etc/passwd
    echo "$LANE_USER:x:$LANE_UID:" >> /run/lane-etc/group
    mount --bind /run/lane-etc/passwd /etc/passwd
    mount --bind /run/lane-etc/group /etc/group
    mkdir -p /tmp/lane-home
    chown "$LANE_UID:$LANE_UID" /tmp/lane-home
}

enable_all() {  # enable every available controller for the children of cgroup $1
    for c in $(cat "$1/cgroup.controllers"); do echo "+$c" > "$1/cgroup.subtree_control"; done
}

run_as_user() {
    HOME=/tmp/lane-home USER=$LANE_USER LOGNAME=$LANE_USER \
        exec setpriv --reuid="$LANE_UID" --regid="$LANE_UID" --clear-groups "$@"
}

case "$LANE" in
root)
    REQUIRE=root,cgroup_v2,userns,overlay,timens,cc
    mkdir -p /tmp/root-home
    export HOME=/tmp/root-home  # the shared /root is read-only
    if [ "${PYNSBOOK_VM_ROOT_CGROUP:-leaf}" = leaf ]; then
        mkdir -p "$CG/lane-root"
        echo $$ > "$CG/lane-root/cgroup.procs"
    fi
    RUN=""
    ;;
delegated)
    # exactly as `systemd-run --user --scope -p Delegate=yes jupyter lab` leaves it: the
    # scope is the user's (directory, cgroup.procs, subtree_control, threads), the lane's
    # processes sit IN it, and its subtree_control is empty: pynsbook has to move them to
    # a leaf before it can enable a controller there
    REQUIRE=cgroup_v2,userns,cc,delegated_scope
    add_user
    enable_all "$CG"
    mkdir "$CG/lane"
    chown "$LANE_UID:$LANE_UID" "$CG/lane" "$CG/lane/cgroup.procs" \
        "$CG/lane/cgroup.subtree_control" "$CG/lane/cgroup.threads"
    echo $$ > "$CG/lane/cgroup.procs"
    RUN=run_as_user
    ;;
nouserns)
    REQUIRE=
    add_user
    echo 0 > /proc/sys/user/max_user_namespaces
    mkdir "$CG/pod"
    echo $$ > "$CG/pod/cgroup.procs"
    RUN=run_as_user
    ;;
*)
    echo "guest_lane.sh: unknown lane $LANE" >&2
    exit 2
    ;;
esac

export PYNSBOOK_LANE="$LANE" PYNSBOOK_REQUIRE="$REQUIRE"
export PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp PYTHONUNBUFFERED=1
cd "$REPO" || exit 2
echo "lane $LANE: runs as uid $([ -n "$RUN" ] && echo $LANE_UID || echo 0), cgroup $(cut -d: -f3 /proc/self/cgroup)," \
     "max_user_namespaces $(cat /proc/sys/user/max_user_namespaces), accel ${PYNSBOOK_VM_ACCEL:-?}"

# Everything below runs with the lane's privileges.
${RUN:+$RUN} /bin/sh -c '
    set -u
    PY=$1; LANE=$2; shift 2
    "$PY" tests/vm/guest_checks.py --lane "$LANE" || checks=$?
    if [ "${PYNSBOOK_VM_CHECKS_ONLY:-0}" = 1 ]; then exit "${checks:-0}"; fi
    junit=""
    [ -d "${PYNSBOOK_VM_OUT:-}" ] && [ -w "$PYNSBOOK_VM_OUT" ] && junit="--junitxml=$PYNSBOOK_VM_OUT/junit-$LANE.xml"
    "$PY" -m pytest -p no:cacheprovider --basetemp="/tmp/pytest-$LANE" --durations=15 --durations-min=3 $junit "$@"
    status=$?
    # pytest 5 = nothing collected: a lane that ran no test proves nothing
    [ "$status" = 5 ] && echo "lane $LANE: pytest collected no tests" >&2
    exit $(( ${checks:-0} ? ${checks:-0} : status ))
' lane "$PY" "$LANE" "$@"
