// SPDX-License-Identifier: Apache-2.0
/*
 * kho-probe: a static /init for the kho-fleet real-kernel lab test.
 *
 * Boots as PID 1 from an initramfs, preserves two memfds through
 * /dev/liveupdate (LUO), reports their physical pages and the debugfs
 * kho/out/fdt on the console, prints "KHO-PROBE READY" and then holds every
 * fd open forever, so the host can dump guest memory over QMP and look for
 * the memfd pages in KHO's preserved-memory radix tree.
 *
 * Build: gcc -static -O2 -Wall -o init kho-probe.c
 *
 * Console protocol (one record per line, all numbers hex unless noted):
 *   KHO-PROBE uname release=<release>
 *   KHO-PROBE memfd token=0x<t> size=<dec bytes> pages=<dec>
 *   KHO-PROBE pfns token=0x<t> <pfn>+<count>,<pfn>+<count>,...   (repeated)
 *   KHO-PROBE memfd-end token=0x<t> pages=<dec> ranges=<dec>
 *   KHO-PROBE outfdt off=<dec> <hex bytes>                         (repeated)
 *   KHO-PROBE outfdt-end len=<dec>
 *   KHO-PROBE READY
 *   KHO-PROBE ERROR <what> errno=<dec>     (then the probe sleeps forever)
 *
 * Page pattern: u64 word i (0..511) of page p of the memfd with token t is
 *   0x4b484f0000000000 ^ (t << 24) ^ (p << 9) ^ i
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

/* include/uapi/linux/liveupdate.h (Linux 7.2), restated so the probe builds
 * against any libc/kernel headers. */
#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_SESSION_NAME_LENGTH 64
#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, 0x00)
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, 0x40)

struct liveupdate_ioctl_create_session {
	uint32_t size;
	int32_t fd;
	uint8_t name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

struct liveupdate_session_preserve_fd {
	uint32_t size;
	int32_t fd;
	uint64_t token __attribute__((aligned(8)));
};

#define PAGE 4096UL
#define PATTERN_BASE 0x4b484f0000000000ULL
#define RANGES_PER_LINE 24
#define FDT_BYTES_PER_LINE 128
#define SESSION_NAME "kho-probe"

struct probe_memfd {
	const char *name;
	uint64_t token;
	size_t size;
	int fd;
	uint8_t *map;
};

static struct probe_memfd memfds[] = {
	{ "kho-probe-a", 0x1001, 8UL << 20, -1, NULL },
	{ "kho-probe-b", 0x1002, (3UL << 20) + PAGE, -1, NULL },
};

static void sleep_forever(void)
{
	for (;;)
		pause();
}

static void say(const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	/* One write per line keeps records whole on the serial console. */
	(void)!write(STDOUT_FILENO, buf, n);
}

static void fail(const char *what)
{
	int e = errno;

	say("KHO-PROBE ERROR %s errno=%d", what, e);
	sleep_forever();
}

static void mount_one(const char *src, const char *dir, const char *type)
{
	char what[128];

	if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
		snprintf(what, sizeof(what), "mkdir-%s", dir);
		fail(what);
	}
	if (mount(src, dir, type, 0, NULL) < 0 && errno != EBUSY) {
		snprintf(what, sizeof(what), "mount-%s", type);
		fail(what);
	}
}

static void ensure_console(void)
{
	int fd;

	if (fcntl(STDOUT_FILENO, F_GETFD) >= 0 && fcntl(STDERR_FILENO, F_GETFD) >= 0)
		return;
	fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return; /* nowhere to report anything */
	dup2(fd, STDIN_FILENO);
	dup2(fd, STDOUT_FILENO);
	dup2(fd, STDERR_FILENO);
	if (fd > STDERR_FILENO)
		close(fd);
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		return;
	(void)!write(fd, text, strlen(text));
	close(fd);
}

static void fill_pattern(struct probe_memfd *m)
{
	size_t pages = m->size / PAGE, p, i;

	for (p = 0; p < pages; p++) {
		uint64_t *w = (uint64_t *)(m->map + p * PAGE);

		for (i = 0; i < PAGE / 8; i++)
			w[i] = PATTERN_BASE ^ (m->token << 24) ^ ((uint64_t)p << 9) ^ i;
	}
}

static void create_memfd(struct probe_memfd *m)
{
	m->fd = (int)syscall(SYS_memfd_create, m->name, 0);
	if (m->fd < 0)
		fail("memfd_create");
	if (ftruncate(m->fd, (off_t)m->size) < 0)
		fail("ftruncate");
	m->map = mmap(NULL, m->size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
	if (m->map == MAP_FAILED)
		fail("mmap");
	fill_pattern(m);
}

static void preserve_memfd(int session_fd, struct probe_memfd *m)
{
	struct liveupdate_session_preserve_fd arg;

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	arg.fd = m->fd;
	arg.token = m->token;
	if (ioctl(session_fd, LIVEUPDATE_SESSION_PRESERVE_FD, &arg) < 0)
		fail("preserve-fd");
}

static void flush_ranges(uint64_t token, const char *buf)
{
	say("KHO-PROBE pfns token=0x%llx %s", (unsigned long long)token, buf);
}

static void report_pfns(int pagemap_fd, struct probe_memfd *m)
{
	size_t pages = m->size / PAGE, p, nranges = 0, in_line = 0;
	uint64_t start = 0, count = 0;
	char line[RANGES_PER_LINE * 40 + 1];
	size_t len = 0;

	line[0] = '\0';
	say("KHO-PROBE memfd token=0x%llx size=%zu pages=%zu",
	    (unsigned long long)m->token, m->size, pages);
	for (p = 0; p <= pages; p++) {
		uint64_t pfn = 0;

		if (p < pages) {
			volatile uint8_t touch = m->map[p * PAGE];
			uint64_t ent;
			off_t off = (off_t)(((uintptr_t)m->map + p * PAGE) / PAGE) * 8;

			(void)touch;
			if (pread(pagemap_fd, &ent, sizeof(ent), off) != sizeof(ent))
				fail("pagemap-read");
			if (!(ent >> 63)) {
				errno = ENODATA;
				fail("pagemap-not-present");
			}
			pfn = ent & ((1ULL << 55) - 1);
			if (!pfn) {
				errno = EPERM;
				fail("pagemap-pfn-zero");
			}
			if (count && pfn == start + count) {
				count++;
				continue;
			}
		}
		if (count) {
			len += snprintf(line + len, sizeof(line) - len, "%s%llx+%llx",
					in_line ? "," : "", (unsigned long long)start,
					(unsigned long long)count);
			nranges++;
			if (++in_line == RANGES_PER_LINE) {
				flush_ranges(m->token, line);
				len = 0;
				in_line = 0;
				line[0] = '\0';
			}
		}
		start = pfn;
		count = 1;
	}
	if (in_line)
		flush_ranges(m->token, line);
	say("KHO-PROBE memfd-end token=0x%llx pages=%zu ranges=%zu",
	    (unsigned long long)m->token, pages, nranges);
}

static void report_outfdt(void)
{
	static uint8_t buf[1 << 20];
	size_t len = 0, off;
	ssize_t n;
	int fd = open("/sys/kernel/debug/kho/out/fdt", O_RDONLY);

	if (fd < 0)
		fail("open-kho-out-fdt");
	while (len < sizeof(buf) && (n = read(fd, buf + len, sizeof(buf) - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail("read-kho-out-fdt");
		}
		len += (size_t)n;
	}
	close(fd);
	for (off = 0; off < len; off += FDT_BYTES_PER_LINE) {
		char hex[FDT_BYTES_PER_LINE * 2 + 1];
		size_t i, end = off + FDT_BYTES_PER_LINE < len ? off + FDT_BYTES_PER_LINE : len;

		for (i = off; i < end; i++)
			snprintf(hex + 2 * (i - off), 3, "%02x", buf[i]);
		say("KHO-PROBE outfdt off=%zu %s", off, hex);
	}
	say("KHO-PROBE outfdt-end len=%zu", len);
}

int main(void)
{
	struct liveupdate_ioctl_create_session cs;
	struct utsname u;
	int lu_fd, pagemap_fd;
	size_t i;

	mount_one("devtmpfs", "/dev", "devtmpfs");
	ensure_console();
	mount_one("proc", "/proc", "proc");
	mount_one("sysfs", "/sys", "sysfs");
	mount_one("debugfs", "/sys/kernel/debug", "debugfs");
	/* Keep kernel chatter (below KERN_ERR) from splitting our lines. */
	write_file("/proc/sys/kernel/printk", "4");

	if (uname(&u) == 0)
		say("KHO-PROBE uname release=%s", u.release);

	lu_fd = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (lu_fd < 0)
		fail("open-dev-liveupdate");
	memset(&cs, 0, sizeof(cs));
	cs.size = sizeof(cs);
	cs.fd = -1;
	strncpy((char *)cs.name, SESSION_NAME, sizeof(cs.name) - 1);
	if (ioctl(lu_fd, LIVEUPDATE_IOCTL_CREATE_SESSION, &cs) < 0)
		fail("create-session");

	for (i = 0; i < sizeof(memfds) / sizeof(memfds[0]); i++) {
		create_memfd(&memfds[i]);
		preserve_memfd(cs.fd, &memfds[i]);
	}

	pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap_fd < 0)
		fail("open-pagemap");
	for (i = 0; i < sizeof(memfds) / sizeof(memfds[0]); i++)
		report_pfns(pagemap_fd, &memfds[i]);
	close(pagemap_fd);

	report_outfdt();
	say("KHO-PROBE READY");
	/* PID 1 must never exit; the fds (and so the session) stay open. */
	sleep_forever();
	return 0;
}
