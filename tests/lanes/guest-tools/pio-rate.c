/*
 * pio-rate: the guest's port-I/O round-trip rate, for benches/xen.sh (a benchmark, not a test).
 *
 * Reads one port with `inb` in a tight loop for a fixed time and prints the rate. Under Xen an
 * `inb` on a port no hypervisor emulator claims becomes one ioreq to the device model and back,
 * so the rate on such a port is the device model's round-trip rate as the guest sees it.
 *
 *   pio-rate [SECS [PORT...]]    default: 2 s on 0x64 (i8042 status: device model) then 0x21
 *                                (8259 master IMR: Xen's own vPIC, the no-device-model baseline)
 *
 * Output, one line per port: HVMDM-PIORATE port=0x64 reads=N secs=S per_s=R ns_per_read=T
 *
 * As PID 1 (kernel argument rdinit=/bin/pio-rate) it is a pre-init: mounts devtmpfs, measures
 * with the defaults, prints to /dev/ttyS0 (the marker console) and to port 0xe9 (Xen's HVM
 * debug console, so the figures reach Xen's log even if the serial path fails), unmounts and
 * execs /init, so the kit's guest-init.sh runs unchanged afterwards. Built statically by build-guest-kit.sh
 * when LANEK_GUEST_TOOLS=1.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Under Xen, port 0xe9 is the hypervisor's HVM debug console: the line also appears as
 * "(dN) ..." on Xen's console, live, whatever happens to the guest's serial port. */
static void xen_debug_line(const char *s)
{
    for (; *s; s++)
        outb((unsigned char)*s, 0xe9);
}

/* Reads PORT for about SECS seconds; checks the clock every 64 reads. */
static void measure(FILE *out, unsigned port, double secs, int debugcon)
{
    char line[160];

    unsigned long n = 0;
    volatile unsigned char sink = 0;
    double t0, t;

    /* Warm-up: the first accesses may fault in the device model's paths. */
    for (int i = 0; i < 64; i++)
        sink ^= inb(port);
    t0 = now();
    do {
        for (int i = 0; i < 64; i++)
            sink ^= inb(port);
        n += 64;
        t = now();
    } while (t - t0 < secs);
    (void)sink;
    t -= t0;
    snprintf(line, sizeof(line),
             "HVMDM-PIORATE port=0x%x reads=%lu secs=%.3f per_s=%.0f ns_per_read=%.0f\n", port, n,
             t, n / t, t * 1e9 / n);
    fputs(line, out);
    fflush(out);
    if (debugcon)
        xen_debug_line(line);
}

int main(int argc, char **argv)
{
    static const unsigned defaults[] = {0x64, 0x21};
    double secs = 2.0;
    int pid1 = getpid() == 1;
    FILE *out = stdout;

    if (!pid1 && argc > 1)
        secs = atof(argv[1]);
    if (iopl(3) != 0) {
        fprintf(stderr, "pio-rate: iopl: %s\n", strerror(errno));
        if (!pid1)
            return 1;
    } else {
        if (pid1) {
            /* The kit's /init mounts devtmpfs itself; undo ours before handing over. */
            mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
            out = fopen("/dev/ttyS0", "w");
            if (!out)
                out = stdout;
            /* Kernel messages may end mid-line on the shared console. */
            fputc('\n', out);
        }
        if (!pid1 && argc > 2) {
            for (int i = 2; i < argc; i++)
                measure(out, (unsigned)strtoul(argv[i], NULL, 0) & 0xffff, secs, 0);
        } else {
            for (size_t i = 0; i < sizeof(defaults) / sizeof(defaults[0]); i++)
                measure(out, defaults[i], secs, pid1);
        }
        if (pid1) {
            if (out != stdout)
                fclose(out);
            umount("/dev");
        }
    }
    if (pid1) {
        char *init_argv[] = {"/init", NULL};
        execv("/init", init_argv);
        perror("pio-rate: exec /init");
        return 1;
    }
    return 0;
}
