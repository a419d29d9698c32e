/*
 * wp_async_stress: does userfaultfd async write-protect + PAGEMAP_SCAN lose writes on this
 * machine, with no Rust (and no precopy code) involved?
 *
 * Writer threads write random u64 values into random pages of an anonymous mapping and keep
 * their own record (the shadow). The main thread runs rounds: one PAGEMAP_SCAN pass over the
 * whole mapping (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, category_mask = return_mask =
 * PAGE_IS_WRITTEN, resuming from walk_end until the pass is complete), then, optionally, a
 * forced full TLB flush, then it copies every reported page into a mirror. After the last
 * round the writers stop, one final round runs, and the mirror must equal memory: a page that
 * differs was written after the round that last reported it, and no later round reported it.
 *
 *   gcc -O2 -pthread -o wp_async_stress wp_async_stress.c          (host)
 *   gcc -static -O2 -pthread -o wp_async_stress wp_async_stress.c  (for the VM guest)
 *   ./wp_async_stress [-c] [-q] [-p] [-n ROUNDS] [-m MIB] [-w WRITERS] [-s SEED] [-u USEC]
 *
 *   -c          force a full TLB flush after each round that reported pages (mprotect a
 *               separate populated 512-page region read-only and back: more pages than the
 *               kernel's single-page INVLPG ceiling, so the kernel flushes the whole TLB,
 *               locally and on the other CPUs running this mm)
 *   -n ROUNDS   rounds while the writers run (default 1000)
 *   -m MIB      size of the tracked mapping (default 256)
 *   -w WRITERS  writer threads (default 4)
 *   -s SEED     seed of the writers' random numbers (default: time)
 *   -q          after each pass, PROCMAP_QUERY the mapping's VMA on /proc/self/maps (as the
 *               precopy scanner does to find unmapped parts)
 *   -p          populate the shadow array (write zeros over it) before the writers start, as
 *               the Rust stress test's Vec<AtomicU64> does
 *   -u USEC     sleep between rounds (default 200)
 *
 * stdout: one JSON object (the summary); stderr: human-readable lines. Exit status: 0 no loss,
 * 1 writes lost (or shadow/memory mismatch), 2 setup error.
 *
 * The kernel ABI is declared here: the system headers (6.1) lack PAGEMAP_SCAN and the newer
 * userfaultfd features.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- kernel ABI (include/uapi/linux/fs.h, userfaultfd.h of Linux >= 6.7) ---- */
struct page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1ULL << 0)
#define PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define PAGE_IS_WRITTEN (1ULL << 1)

struct procmap_query {
	uint64_t size;
	uint64_t query_flags;
	uint64_t query_addr;
	uint64_t vma_start;
	uint64_t vma_end;
	uint64_t vma_flags;
	uint64_t vma_page_size;
	uint64_t vma_offset;
	uint64_t inode;
	uint32_t dev_major;
	uint32_t dev_minor;
	uint32_t vma_name_size;
	uint32_t build_id_size;
	uint64_t vma_name_addr;
	uint64_t build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 16ULL

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#define FEAT_WP_UNPOPULATED (1ULL << 13)
#define FEAT_WP_ASYNC (1ULL << 15)

_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
_Static_assert(sizeof(struct page_region) == 24, "page_region is 24 bytes");
_Static_assert(PAGEMAP_SCAN == 0xC0606610, "PAGEMAP_SCAN number");
_Static_assert(sizeof(struct procmap_query) == 104, "procmap_query is 104 bytes");
_Static_assert(PROCMAP_QUERY == 0xC0686611, "PROCMAP_QUERY number");
_Static_assert(UFFDIO_WRITEPROTECT == 0xC018AA06, "UFFDIO_WRITEPROTECT number");

#define PAGE 4096ULL
#define WORDS_PER_PAGE (PAGE / 8)
#define BLOCK_PAGES 64ULL
#define VEC_LEN 4096
#define FLUSH_PAGES 512

/* ---- state ---- */
static uint8_t *mem;        /* tracked mapping */
static uint8_t *mirror;     /* what the rounds copied out */
static uint64_t *shadow;    /* what the writers wrote (each word has one writer) */
static uint64_t npages, nwriters;
static _Atomic uint64_t rounds_done;
static _Atomic uint64_t *last_write;  /* per page: rounds_done when last written */
static uint64_t *last_report;         /* per page: last round that reported it */
static atomic_bool stop;
static _Atomic uint64_t total_writes;
static int pagemap_fd;
static int maps_fd = -1;    /* -q: /proc/self/maps for PROCMAP_QUERY */
static uint8_t *flush_region;
static uint64_t seed;

static void die(const char *what)
{
	fprintf(stderr, "wp_async_stress: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* xorshift64* */
static uint64_t rnd(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static void *writer(void *arg)
{
	uint64_t id = (uint64_t)(uintptr_t)arg;
	uint64_t s = (seed ^ (0x9E3779B97F4A7C15ULL * (id + 1))) | 1;
	uint64_t nblocks = npages / BLOCK_PAGES;
	uint64_t mine = (nblocks - id + nwriters - 1) / nwriters; /* blocks b with b % W == id */
	uint64_t n = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		uint64_t block = id + nwriters * (rnd(&s) % mine);
		uint64_t first = block * BLOCK_PAGES + rnd(&s) % BLOCK_PAGES;
		uint64_t run = 1 + rnd(&s) % 8;
		if (run > BLOCK_PAGES - first % BLOCK_PAGES)
			run = BLOCK_PAGES - first % BLOCK_PAGES;
		for (uint64_t p = first; p < first + run; p++) {
			uint64_t word = p * WORDS_PER_PAGE + rnd(&s) % WORDS_PER_PAGE;
			uint64_t value = rnd(&s);
			*(volatile uint64_t *)(mem + word * 8) = value;
			shadow[word] = value;
			atomic_store_explicit(&last_write[p],
					      atomic_load(&rounds_done), memory_order_relaxed);
		}
		if (++n % 64 == 0) {
			atomic_fetch_add_explicit(&total_writes, 64, memory_order_relaxed);
			sched_yield();
		}
	}
	atomic_fetch_add_explicit(&total_writes, n % 64, memory_order_relaxed);
	return NULL;
}

/* One pass over the whole mapping; reported regions are appended to out. Returns the count. */
static uint64_t scan_pass(struct page_region *out, uint64_t *calls)
{
	static struct page_region vec[VEC_LEN];
	uint64_t cur = (uint64_t)(uintptr_t)mem, end = cur + npages * PAGE, n = 0;

	while (cur < end) {
		struct pm_scan_arg a = {
			.size = sizeof(a),
			.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
			.start = cur,
			.end = end,
			.vec = (uint64_t)(uintptr_t)vec,
			.vec_len = VEC_LEN,
			.category_mask = PAGE_IS_WRITTEN,
			.return_mask = PAGE_IS_WRITTEN,
		};
		long r = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
		if (r < 0)
			die("PAGEMAP_SCAN");
		(*calls)++;
		memcpy(out + n, vec, (size_t)r * sizeof(vec[0]));
		n += (uint64_t)r;
		if (a.walk_end <= cur) {
			errno = EPROTO;
			die("PAGEMAP_SCAN made no progress");
		}
		cur = a.walk_end;
	}
	return n;
}

static void tlb_flush(void)
{
	if (mprotect(flush_region, FLUSH_PAGES * PAGE, PROT_READ))
		die("mprotect(PROT_READ)");
	if (mprotect(flush_region, FLUSH_PAGES * PAGE, PROT_READ | PROT_WRITE))
		die("mprotect(PROT_READ|PROT_WRITE)");
}

/* A round: scan, optionally flush, then copy what was reported. Returns pages reported. */
static uint64_t round_and_copy(struct page_region *regions, int flush, uint64_t *calls)
{
	uint64_t n = scan_pass(regions, calls), pages = 0;
	uint64_t round = atomic_load(&rounds_done);

	if (maps_fd >= 0) {
		/* What the Rust scanner does after each span: look the VMA up. */
		struct procmap_query q = {
			.size = sizeof(q),
			.query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
			.query_addr = (uint64_t)(uintptr_t)mem,
		};
		if (ioctl(maps_fd, PROCMAP_QUERY, &q))
			die("PROCMAP_QUERY");
	}

	for (uint64_t i = 0; i < n; i++)
		pages += (regions[i].end - regions[i].start) / PAGE;
	if (flush && pages)
		tlb_flush();
	for (uint64_t i = 0; i < n; i++) {
		uint64_t off = regions[i].start - (uint64_t)(uintptr_t)mem;
		uint64_t len = regions[i].end - regions[i].start;
		memcpy(mirror + off, mem + off, len);
		for (uint64_t p = off / PAGE; p < (off + len) / PAGE; p++)
			last_report[p] = round;
	}
	atomic_fetch_add(&rounds_done, 1);
	return pages;
}

/* Whether the page reads as written (not write-protected) now; does not re-protect it. */
static int reads_as_written(uint64_t page)
{
	struct page_region r;
	struct pm_scan_arg a = {
		.size = sizeof(a),
		.start = (uint64_t)(uintptr_t)mem + page * PAGE,
		.end = (uint64_t)(uintptr_t)mem + (page + 1) * PAGE,
		.vec = (uint64_t)(uintptr_t)&r,
		.vec_len = 1,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};
	long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
	return n < 0 ? -1 : (int)n;
}

int main(int argc, char **argv)
{
	uint64_t mib = 256, rounds = 1000, usec = 200;
	int flush = 0, query = 0, populate = 0, opt;

	nwriters = 4;
	seed = now_ns();
	while ((opt = getopt(argc, argv, "cqpn:m:w:s:u:")) != -1) {
		switch (opt) {
		case 'c': flush = 1; break;
		case 'q': query = 1; break;
		case 'p': populate = 1; break;
		case 'n': rounds = strtoull(optarg, NULL, 0); break;
		case 'm': mib = strtoull(optarg, NULL, 0); break;
		case 'w': nwriters = strtoull(optarg, NULL, 0); break;
		case 's': seed = strtoull(optarg, NULL, 0); break;
		case 'u': usec = strtoull(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-c] [-q] [-p] [-n ROUNDS] [-m MIB] [-w WRITERS] "
					"[-s SEED] [-u USEC]\n", argv[0]);
			return 2;
		}
	}
	npages = (mib << 20) / PAGE;
	if (nwriters < 1 || npages / BLOCK_PAGES < nwriters) {
		fprintf(stderr, "wp_async_stress: need 1 <= writers <= %llu\n",
			(unsigned long long)(npages / BLOCK_PAGES));
		return 2;
	}
	size_t len = npages * PAGE;

	mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	mirror = calloc(len, 1);
	shadow = calloc(len / 8, 8);
	last_write = calloc(npages, sizeof(*last_write));
	last_report = calloc(npages, sizeof(*last_report));
	struct page_region *regions = calloc(npages, sizeof(*regions));
	if (!mirror || !shadow || !last_write || !last_report || !regions)
		die("calloc");
	if (populate)
		memset(shadow, 0, len);
	for (uint64_t p = 0; p < npages; p++) {
		last_write[p] = UINT64_MAX;
		last_report[p] = UINT64_MAX;
	}
	flush_region = mmap(NULL, FLUSH_PAGES * PAGE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (flush_region == MAP_FAILED)
		die("mmap flush region");
	madvise(flush_region, FLUSH_PAGES * PAGE, MADV_NOHUGEPAGE);
	memset(flush_region, 1, FLUSH_PAGES * PAGE);

	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (uffd < 0)
		die("userfaultfd");
	struct uffdio_api api = { .api = UFFD_API,
				  .features = FEAT_WP_ASYNC | FEAT_WP_UNPOPULATED };
	if (ioctl(uffd, UFFDIO_API, &api))
		die("UFFDIO_API (WP_ASYNC|WP_UNPOPULATED)");
	struct uffdio_register reg = {
		.range = { .start = (uint64_t)(uintptr_t)mem, .len = len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	struct uffdio_writeprotect wp = {
		.range = { .start = (uint64_t)(uintptr_t)mem, .len = len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp))
		die("UFFDIO_WRITEPROTECT");
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open /proc/self/pagemap");
	if (query && (maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)) < 0)
		die("open /proc/self/maps");

	uint64_t calls = 0, busy = 0, pages_total = 0;
	uint64_t t0 = now_ns();
	/* A clean start reports nothing. */
	uint64_t first = round_and_copy(regions, flush, &calls);
	if (first) {
		fprintf(stderr, "wp_async_stress: %llu pages reported before any write\n",
			(unsigned long long)first);
		return 2;
	}

	pthread_t th[64];
	if (nwriters > 64)
		nwriters = 64;
	for (uint64_t i = 0; i < nwriters; i++)
		if ((errno = pthread_create(&th[i], NULL, writer, (void *)(uintptr_t)i)))
			die("pthread_create");
	for (uint64_t r = 0; r < rounds; r++) {
		uint64_t pages = round_and_copy(regions, flush, &calls);
		busy += pages > 0;
		pages_total += pages;
		if (usec)
			usleep((useconds_t)usec);
	}
	atomic_store(&stop, 1);
	for (uint64_t i = 0; i < nwriters; i++)
		pthread_join(th[i], NULL);
	/* Final round: everything written since the last one. */
	pages_total += round_and_copy(regions, flush, &calls);
	uint64_t t1 = now_ns();

	uint64_t lost = 0, shadow_bad = 0, rounds_all = atomic_load(&rounds_done);
	for (uint64_t p = 0; p < npages; p++) {
		if (memcmp(mem + p * PAGE, mirror + p * PAGE, PAGE) == 0)
			continue;
		if (lost++ < 10) {
			uint64_t w0 = p * WORDS_PER_PAGE, w = w0, diff = 0;
			for (uint64_t i = w0; i < w0 + WORDS_PER_PAGE; i++)
				if (((uint64_t *)mem)[i] != ((uint64_t *)mirror)[i]) {
					if (!diff++)
						w = i;
				}
			fprintf(stderr,
				"LOST page %llu: %llu words differ, word %llu memory %#llx mirror "
				"%#llx shadow %#llx; last written after round %lld of %llu, last "
				"reported by round %lld; reads as written now: %d\n",
				(unsigned long long)p, (unsigned long long)diff,
				(unsigned long long)w, (unsigned long long)((uint64_t *)mem)[w],
				(unsigned long long)((uint64_t *)mirror)[w],
				(unsigned long long)shadow[w], (long long)last_write[p],
				(unsigned long long)rounds_all, (long long)last_report[p],
				reads_as_written(p));
		}
	}
	for (uint64_t i = 0; i < len / 8; i++)
		shadow_bad += ((uint64_t *)mem)[i] != shadow[i];
	/* After the final round nothing may be left to report (does not re-protect). */
	uint64_t left = 0;
	{
		struct pm_scan_arg a = {
			.size = sizeof(a),
			.start = (uint64_t)(uintptr_t)mem,
			.end = (uint64_t)(uintptr_t)mem + len,
			.vec = (uint64_t)(uintptr_t)regions,
			.vec_len = npages,
			.category_mask = PAGE_IS_WRITTEN,
			.return_mask = PAGE_IS_WRITTEN,
		};
		long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
		if (n < 0)
			die("PAGEMAP_SCAN (check)");
		for (long i = 0; i < n; i++)
			left += (regions[i].end - regions[i].start) / PAGE;
	}
	cpu_set_t cpus;
	int ncpu = sched_getaffinity(0, sizeof(cpus), &cpus) ? -1 : CPU_COUNT(&cpus);

	fprintf(stderr,
		"wp_async_stress: %llu MiB, %llu writers, %llu rounds (%llu reported pages, %llu "
		"pages in all, %llu ioctls), %llu write ops, %s, %d CPUs allowed, %.2f s: "
		"%llu pages LOST, %llu shadow words differ, %llu pages left\n",
		(unsigned long long)mib, (unsigned long long)nwriters,
		(unsigned long long)rounds, (unsigned long long)busy,
		(unsigned long long)pages_total, (unsigned long long)calls,
		(unsigned long long)atomic_load(&total_writes),
		flush ? "full TLB flush after each round" : "no extra flush", ncpu,
		(double)(t1 - t0) / 1e9, (unsigned long long)lost,
		(unsigned long long)shadow_bad, (unsigned long long)left);
	printf("{\"mib\":%llu,\"writers\":%llu,\"rounds\":%llu,\"busy_rounds\":%llu,"
	       "\"pages_reported\":%llu,\"write_ops\":%llu,\"full_tlb_flush\":%s,"
	       "\"procmap_query\":%s,\"cpus\":%d,"
	       "\"seconds\":%.3f,\"seed\":%llu,\"lost_pages\":%llu,\"shadow_mismatch_words\":%llu,"
	       "\"left_after_final\":%llu}\n",
	       (unsigned long long)mib, (unsigned long long)nwriters,
	       (unsigned long long)rounds, (unsigned long long)busy,
	       (unsigned long long)pages_total, (unsigned long long)atomic_load(&total_writes),
	       flush ? "true" : "false", query ? "true" : "false", ncpu,
	       (double)(t1 - t0) / 1e9,
	       (unsigned long long)seed, (unsigned long long)lost,
	       (unsigned long long)shadow_bad, (unsigned long long)left);
	return (lost || shadow_bad || left) ? 1 : 0;
}
