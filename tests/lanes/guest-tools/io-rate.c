/*
 * io-rate: block-device throughput as the guest sees it, for benches/storage.sh (a benchmark,
 * not a test). O_DIRECT, so every request reaches the (emulated) disk controller.
 *
 *   io-rate DEV MODE SECS [BS [THREADS]]
 *     MODE seqread | seqwrite: BS-byte requests (default 1 MiB) from offset 0, wrapping at the
 *          device end, for SECS seconds (seqwrite writes a fixed pattern and fdatasyncs at the end)
 *     MODE randread: BS-byte (default 4096) reads at random BS-aligned offsets, THREADS
 *          (default 1) threads each with one request in flight (queue depth = THREADS)
 *
 * Output: HVMDM-IORATE dev=DEV mode=MODE bs=BS threads=T ops=N bytes=B secs=S mbs=M iops=I
 * (M in MB/s, 10^6 bytes). Built statically by build-guest-kit.sh when LANEK_GUEST_TOOLS=1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct job {
    int fd;
    const char *mode;
    size_t bs;
    uint64_t size;
    double secs;
    unsigned seed;
    uint64_t ops;
    int err;
};

static void *run(void *arg)
{
    struct job *j = arg;
    void *buf;
    if (posix_memalign(&buf, 4096, j->bs)) {
        j->err = ENOMEM;
        return NULL;
    }
    memset(buf, 0xa5, j->bs);
    uint64_t blocks = j->size / j->bs, pos = 0;
    double end = now() + j->secs;
    int write = strcmp(j->mode, "seqwrite") == 0, rnd = strcmp(j->mode, "randread") == 0;
    while (now() < end) {
        for (int k = 0; k < 16; k++) {
            uint64_t b;
            if (rnd) {
                j->seed = j->seed * 1103515245u + 12345u;
                b = (((uint64_t)j->seed << 16) ^ (j->seed >> 8)) % blocks;
            } else {
                b = pos++ % blocks;
            }
            ssize_t n = write ? pwrite(j->fd, buf, j->bs, b * j->bs) : pread(j->fd, buf, j->bs, b * j->bs);
            if (n != (ssize_t)j->bs) {
                j->err = n < 0 ? errno : EIO;
                return NULL;
            }
            j->ops++;
        }
    }
    if (write && fdatasync(j->fd))
        j->err = errno;
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: io-rate DEV seqread|seqwrite|randread SECS [BS [THREADS]]\n");
        return 2;
    }
    const char *dev = argv[1], *mode = argv[2];
    double secs = atof(argv[3]);
    int rnd = strcmp(mode, "randread") == 0;
    size_t bs = argc > 4 ? strtoul(argv[4], NULL, 0) : (rnd ? 4096 : 1 << 20);
    int threads = argc > 5 ? atoi(argv[5]) : 1;
    if (threads < 1 || threads > 64 || bs < 512 || bs % 512 || secs <= 0)
        return 2;
    int write = strcmp(mode, "seqwrite") == 0;
    int fd = open(dev, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        perror(dev);
        return 1;
    }
    uint64_t size = lseek(fd, 0, SEEK_END);
    if (size < bs) {
        fprintf(stderr, "%s: too small\n", dev);
        return 1;
    }
    struct job jobs[64];
    pthread_t tid[64];
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){ fd, mode, bs, size, secs, 12345u + 7919u * i, 0, 0 };
        pthread_create(&tid[i], NULL, run, &jobs[i]);
    }
    uint64_t ops = 0;
    int err = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        ops += jobs[i].ops;
        if (jobs[i].err)
            err = jobs[i].err;
    }
    double dt = now() - t0;
    if (err) {
        fprintf(stderr, "io-rate %s %s: %s\n", dev, mode, strerror(err));
        return 1;
    }
    printf("HVMDM-IORATE dev=%s mode=%s bs=%zu threads=%d ops=%llu bytes=%llu secs=%.3f mbs=%.2f iops=%.0f\n",
           dev, mode, bs, threads, (unsigned long long)ops, (unsigned long long)(ops * bs), dt,
           ops * bs / dt / 1e6, ops / dt);
    return 0;
}
