/*
 * pynsbook's resident processes, made small.
 *
 * Python builds a container (namespaces, cgroup, root filesystem) in forks of a warm
 * interpreter; once that work is done, the container's init and its shim have nothing
 * left to do but wait. Waiting in a forked interpreter costs megabytes of copied pages per
 * container; waiting in this program costs kilobytes. Each execs it in place of itself:
 *
 *   tinyinit init FD            PID 1 of the container: say {"event": "ready"} on FD,
 *                               then reap every process that ends
 *                               (orphans are reparented to PID 1), pass the signals a
 *                               host sends it (`kill -USR1 <init>`) on to every process of
 *                               the namespace, and exit when FD, the client's socket and
 *                               the container's lifeline, closes. As PID 1, its exit ends
 *                               every process of the namespace.
 *   tinyinit shim PID DIR...    the init's parent, outside the PID namespace: wait for
 *                               PID, then empty and remove each cgroup DIR (nested cgroups
 *                               first) and its session directory if that is now empty,
 *                               and exit with PID's status (128+N for signal N).
 *
 * pynsbook/engine/tiny.py compiles it once per machine; without a C compiler the same
 * work is done in Python (init.py, shim.py), which holds more memory but is equivalent.
 * Under the warm launcher the shim hands init over and exits at once (launcher.py waits
 * and removes the cgroups); "shim" mode is for the slow path, without a launcher.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void nap_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

#define READY "{\"event\": \"ready\"}"

static const int forwarded[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 };

static int run_init(int fd)
{
	sigset_t mask;
	struct pollfd p[2];
	char buf[512];
	int pid1 = getpid() == 1;

	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
		sigaddset(&mask, forwarded[i]);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		return 125;
	p[0].fd = fd;
	p[0].events = POLLIN;
	p[1].fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	p[1].events = POLLIN;
	if (p[1].fd < 0)
		return 125;
	/* the container is ready once this program runs: say so (Python built the rest) */
	if (send(fd, READY, sizeof READY - 1, MSG_NOSIGNAL) < 0)
		return 0;
	for (;;) {
		struct signalfd_siginfo si;
		ssize_t n;

		/* processes that ended before the signal mask was set are reaped here too */
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (poll(p, 2, -1) < 0 && errno != EINTR)
			return 125;
		while (read(p[1].fd, &si, sizeof si) > 0) {
			/* kill(-1) from PID 1 reaches every process of its own PID namespace and
			 * nothing outside it; without a PID namespace there is no such scope, so
			 * nothing is forwarded (signal the processes themselves) */
			if (pid1 && si.ssi_signo != SIGCHLD)
				kill(-1, (int)si.ssi_signo);
		}
		if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL))
			return 0;
		if (p[0].revents & POLLIN) {
			/* nothing is asked of this init: a message (or descriptors beside it,
			 * which the kernel closes when no control buffer takes them) is dropped;
			 * end of file means the client is gone or stopped the container */
			n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				return 0;
		}
	}
}

static int read_pids(const char *dir, pid_t *pids, int max)
{
	char path[PATH_MAX];
	FILE *f;
	int n = 0;
	long v;

	snprintf(path, sizeof path, "%s/cgroup.procs", dir);
	f = fopen(path, "re");
	if (!f)
		return 0;
	while (n < max && fscanf(f, "%ld", &v) == 1)
		pids[n++] = (pid_t)v;
	fclose(f);
	return n;
}

/* rmdir, waiting up to 2 s for exiting processes to leave the cgroup (EBUSY) */
static void rmdir_retry(const char *dir)
{
	for (int i = 0; i < 200; i++) {
		if (rmdir(dir) == 0 || errno != EBUSY)
			return;
		nap_ms(10);
	}
}

/* Empty and delete a cgroup and the cgroups nested in it, deepest first. Processes are
 * left only when the container has no PID namespace; they are killed by PID, as read
 * from this cgroup, so nothing outside it is touched. */
static void remove_tree(const char *dir, int depth)
{
	DIR *d = depth < 32 ? opendir(dir) : NULL;
	struct dirent *e;
	pid_t pids[1024];

	if (d) {
		while ((e = readdir(d)) != NULL) {
			char sub[PATH_MAX];

			if (e->d_type != DT_DIR || !strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			if (snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name) < (int)sizeof sub)
				remove_tree(sub, depth + 1);
		}
		closedir(d);
	}
	for (int round = 0; round < 50; round++) {
		int n = read_pids(dir, pids, 1024);

		if (n == 0)
			break;
		for (int i = 0; i < n; i++)
			kill(pids[i], SIGKILL);
		nap_ms(5);
	}
	rmdir_retry(dir);
}

static int run_shim(pid_t init, int ndirs, char **dirs)
{
	int status = 0;

	while (waitpid(init, &status, 0) < 0) {
		if (errno != EINTR) {
			status = 125 << 8;
			break;
		}
	}
	for (int i = 0; i < ndirs; i++)
		remove_tree(dirs[i], 0);
	/* the session's last container: its directory goes too (the client may be gone),
	 * and pynsbook's own directory above it, if that was the last session */
	for (int i = 0; i < ndirs; i++) {
		for (int up = 0; up < 2; up++) {
			char *slash = strrchr(dirs[i], '/');

			if (!slash || slash == dirs[i])
				break;
			*slash = '\0';
			if (rmdir(dirs[i]) < 0)
				break;
		}
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 125;
}

int main(int argc, char **argv)
{
	/* executed from a descriptor, the command name would be that descriptor's number:
	 * give `ps` a name a student can read */
	if (argc == 3 && !strcmp(argv[1], "init")) {
		prctl(PR_SET_NAME, "pynsbook-init");
		/* exec made it dumpable again: no process of the container may trace or read
		 * the init (it holds the container's lifeline) without SYS_PTRACE */
		prctl(PR_SET_DUMPABLE, 0);
		return run_init(atoi(argv[2]));
	}
	if (argc >= 3 && !strcmp(argv[1], "shim")) {
		prctl(PR_SET_NAME, "pynsbook-shim");
		return run_shim((pid_t)atol(argv[2]), argc - 3, argv + 3);
	}
	fprintf(stderr, "usage: tinyinit init FD | tinyinit shim PID [CGROUP_DIR...]\n");
	return 2;
}
