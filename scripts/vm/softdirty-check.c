/* Guest sanity check for the VM harness (scripts/vm): does this kernel track soft-dirty, and does it
 * have userfaultfd async write-protect and PAGEMAP_SCAN? Prints one JSON object on stdout.
 *
 * Built statically by scripts/vm/mkinitramfs.sh (gcc -static -O2). Needs no kernel headers newer
 * than 5.x: the PAGEMAP_SCAN ABI is declared here.
 *
 * soft-dirty: write a page, write "4" to /proc/self/clear_refs, read pagemap bit 55 (expect 0), write
 * the page again, read bit 55 (expect 1). A kernel without CONFIG_MEM_SOFT_DIRTY accepts the "4" but
 * bit 55 stays 0, so "supported" is true only if the bit goes 0 -> 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#define PM_SOFT_DIRTY (1ULL << 55)
#define PM_PRESENT (1ULL << 63)

struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN (1ULL << 1)

struct uffdio_api_ { uint64_t api, features, ioctls; };
#define UFFDIO_API_ _IOWR(0xAA, 0x3F, struct uffdio_api_)
#define UFFD_FEATURE_WP_ASYNC_ (1ULL << 15)
#define UFFD_FEATURE_WP_UNPOPULATED_ (1ULL << 13)

static int pagemap_fd = -1;

/* Pagemap entry of addr, or 0 if it cannot be read (bit 63 is "present", so no signed sentinel). */
static uint64_t pagemap_entry(void *addr) {
    uint64_t e;
    long psz = sysconf(_SC_PAGESIZE);
    off_t off = (off_t)((uintptr_t)addr / psz) * 8;
    if (pread(pagemap_fd, &e, 8, off) != 8) return 0;
    return e;
}

static int clear_refs(void) {
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0) return -errno;
    int r = write(fd, "4", 1) == 1 ? 0 : -errno;
    close(fd);
    return r;
}

int main(void) {
    struct utsname u;
    uname(&u);
    long psz = sysconf(_SC_PAGESIZE);
    volatile char *p = mmap(NULL, psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 2; }
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap_fd < 0) { perror("open pagemap"); return 2; }

    p[0] = 1;
    uint64_t e_new = pagemap_entry((void *)p);
    int cr = clear_refs();
    uint64_t e_clear = pagemap_entry((void *)p);
    p[0] = 2;
    uint64_t e_write = pagemap_entry((void *)p);
    int sd_new = !!(e_new & PM_SOFT_DIRTY);
    int sd_clear = !!(e_clear & PM_SOFT_DIRTY);
    int sd_write = !!(e_write & PM_SOFT_DIRTY);
    int present = !!(e_write & PM_PRESENT);
    int sd_ok = cr == 0 && present && !sd_clear && sd_write;

    /* userfaultfd features (throwaway fd: UFFDIO_API succeeds once per fd). */
    long long uffd_features = -1;
    int uffd_errno = 0;
    int ufd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (ufd >= 0) {
        struct uffdio_api_ api = { .api = 0xAA, .features = 0 };
        if (ioctl(ufd, UFFDIO_API_, &api) == 0) uffd_features = (long long)api.features;
        else uffd_errno = errno;
        close(ufd);
    } else {
        uffd_errno = errno;
    }

    /* PAGEMAP_SCAN: a plain read-only query (no WP flags) over our page. ENOTTY/EINVAL = absent. */
    struct page_region reg[4];
    struct pm_scan_arg arg = {
        .size = sizeof(arg), .start = (uintptr_t)p, .end = (uintptr_t)p + psz,
        .vec = (uintptr_t)reg, .vec_len = 4, .category_mask = PAGE_IS_WRITTEN,
        .return_mask = PAGE_IS_WRITTEN,
    };
    int scan = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    int scan_errno = scan < 0 ? errno : 0;

    char thp[128] = "";
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f) { if (!fgets(thp, sizeof thp, f)) thp[0] = 0; fclose(f); thp[strcspn(thp, "\n")] = 0; }

    printf("{\"uname_r\":\"%s\",\"uname_v\":\"%s\",\"page_size\":%ld,"
           "\"soft_dirty\":{\"supported\":%s,\"clear_refs_errno\":%d,\"bit55_new_page\":%d,"
           "\"bit55_after_clear\":%d,\"bit55_after_write\":%d,\"present\":%d},"
           "\"uffd\":{\"api_features\":%lld,\"errno\":%d,\"wp_async\":%s,\"wp_unpopulated\":%s},"
           "\"pagemap_scan\":{\"supported\":%s,\"ret\":%d,\"errno\":%d},"
           "\"thp_enabled\":\"%s\"}\n",
           u.release, u.version, psz, sd_ok ? "true" : "false", cr < 0 ? -cr : 0, sd_new, sd_clear,
           sd_write, present, uffd_features, uffd_errno,
           uffd_features >= 0 && (uffd_features & UFFD_FEATURE_WP_ASYNC_) ? "true" : "false",
           uffd_features >= 0 && (uffd_features & UFFD_FEATURE_WP_UNPOPULATED_) ? "true" : "false",
           scan >= 0 ? "true" : "false", scan, scan_errno, thp);
    return 0;
}
