// How long SIGSTOP takes to stop a busy multi-threaded process (every thread in state T), with
// and without raising its threads to SCHED_FIFO 1 right before the signal (put back while it is
// stopped, before SIGCONT), the two ways alternated. The controller runs at SCHED_FIFO 1 when
// SELF_RT is set, as the driver's final phase does (raising the target without it starves the
// controller: measured p90 88 ms). Needs root (CAP_SYS_NICE).
//
//   cc -O2 -pthread -o /tmp/stop-latency scripts/downtime/stop-latency.c
//   SELF_RT=1 /tmp/stop-latency THREADS ITERATIONS
#define _GNU_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile char *mem;

static void *writer(void *a) {
    long id = (long)a;
    for (unsigned long i = 0;; i++) mem[id * 4096 * 64 + (i * 4096) % (4096 * 64)] = (char)i;
    return 0;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int tids(int pid, int *out, int max) {
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/task", pid);
    DIR *d = opendir(p);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) && n < max)
        if (e->d_name[0] != '.') out[n++] = atoi(e->d_name);
    if (d) closedir(d);
    return n;
}

static int all_stopped(int pid, const int *t, int n) {
    for (int i = 0; i < n; i++) {
        char p[96], buf[512];
        snprintf(p, sizeof p, "/proc/%d/task/%d/stat", pid, t[i]);
        FILE *f = fopen(p, "r");
        if (!f) continue;
        size_t k = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[k] = 0;
        char *c = strrchr(buf, ')');
        if (!c || c[2] != 'T') return 0;
    }
    return 1;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int nthreads = argc > 1 ? atoi(argv[1]) : 2, iters = argc > 2 ? atoi(argv[2]) : 100;
    if (nthreads < 1 || nthreads > 64 || iters < 1) return 2;
    int pid = fork();
    if (pid == 0) {
        mem = calloc(nthreads + 1, 4096 * 64);
        pthread_t th[64];
        for (long i = 1; i < nthreads; i++) pthread_create(&th[i], 0, writer, (void *)i);
        writer(0);
    }
    usleep(200000);
    struct sched_param me = {1}, rt = {1}, other = {0};
    if (getenv("SELF_RT")) sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &me);
    int t[64];
    int n = tids(pid, t, 64);
    double *res[2] = {calloc(iters, sizeof(double)), calloc(iters, sizeof(double))};
    for (int it = 0; it < 2 * iters; it++) {
        int raised = it % 2;
        usleep(20000 + rand() % 10000);
        double t0 = now_ms();
        if (raised)
            for (int i = 0; i < n; i++) sched_setscheduler(t[i], SCHED_FIFO | SCHED_RESET_ON_FORK, &rt);
        kill(pid, SIGSTOP);
        while (!all_stopped(pid, t, n)) usleep(100);
        double t1 = now_ms();
        if (raised)
            for (int i = 0; i < n; i++) sched_setscheduler(t[i], SCHED_OTHER, &other);
        kill(pid, SIGCONT);
        res[raised][it / 2] = t1 - t0;
    }
    kill(pid, SIGKILL);
    waitpid(pid, 0, 0);
    for (int m = 0; m < 2; m++) {
        qsort(res[m], iters, sizeof(double), cmp);
        printf("%s: min %.3f median %.3f p90 %.3f max %.3f ms (n=%d)\n", m ? "raised" : "plain ",
               res[m][0], res[m][iters / 2], res[m][iters * 9 / 10], res[m][iters - 1], iters);
    }
    return 0;
}
