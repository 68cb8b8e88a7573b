/*
 * LD_PRELOAD shim that lets Debian's C xenstored (Xen 4.17) run on a host without a
 * hypervisor, for testing xenstore clients over its unix socket only.
 *
 * It fakes the few Xen library calls xenstored makes at start-up: the hypervisor handle,
 * domain info (only dom0 exists), event channels (an eventfd that never fires), grant
 * tables (nothing to map), and the dom0 ring files /proc/xen/xsd_port and xsd_kva
 * (memfds). It also clamps RLIMIT_NOFILE raises a container refuses.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

static int dummy_handle;
static int evt_fd = -1;
static int next_port = 10;

xc_interface *xc_interface_open(xentoollog_logger *l, xentoollog_logger *dl, unsigned flags)
{
    (void)l; (void)dl; (void)flags;
    return (xc_interface *)&dummy_handle;
}

int xc_interface_close(xc_interface *h) { (void)h; return 0; }

int xc_domain_getinfo(xc_interface *h, uint32_t first, unsigned int max, xc_dominfo_t *info)
{
    (void)h;
    if (first != 0 || max < 1)
        return 0;
    memset(info, 0, sizeof(*info));
    info->domid = 0;
    info->running = 1;
    return 1;
}

xenevtchn_handle *xenevtchn_open(xentoollog_logger *l, unsigned flags)
{
    (void)l; (void)flags;
    if (evt_fd < 0)
        evt_fd = eventfd(0, EFD_CLOEXEC);
    return (xenevtchn_handle *)&dummy_handle;
}

xenevtchn_handle *xenevtchn_fdopen(xentoollog_logger *l, int fd, unsigned flags)
{
    (void)fd;
    return xenevtchn_open(l, flags);
}

int xenevtchn_close(xenevtchn_handle *h) { (void)h; return 0; }
int xenevtchn_fd(xenevtchn_handle *h) { (void)h; return evt_fd; }
int xenevtchn_notify(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; return 0; }
int xenevtchn_unmask(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; return 0; }
int xenevtchn_unbind(xenevtchn_handle *h, evtchn_port_t p) { (void)h; (void)p; return 0; }

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *h, unsigned int virq)
{
    (void)h; (void)virq;
    return next_port++;
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *h, uint32_t dom, evtchn_port_t p)
{
    (void)h; (void)dom; (void)p;
    return next_port++;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *h)
{
    (void)h;
    errno = EAGAIN;
    return -1;
}

xengnttab_handle *xengnttab_open(xentoollog_logger *l, unsigned flags)
{
    (void)l; (void)flags;
    return (xengnttab_handle *)&dummy_handle;
}

int xengnttab_close(xengnttab_handle *h) { (void)h; return 0; }
int xengnttab_set_max_grants(xengnttab_handle *h, uint32_t n) { (void)h; (void)n; return 0; }

void *xengnttab_map_grant_ref(xengnttab_handle *h, uint32_t dom, uint32_t ref, int prot)
{
    (void)h; (void)dom; (void)ref; (void)prot;
    errno = ENOSYS;
    return NULL;
}

int xengnttab_unmap(xengnttab_handle *h, void *a, uint32_t n) { (void)h; (void)a; (void)n; return 0; }

static int fake_file(const char *path)
{
    if (strcmp(path, "/proc/xen/xsd_port") == 0) {
        int fd = memfd_create("xsd_port", MFD_CLOEXEC);
        if (fd >= 0 && (write(fd, "1\n", 2) != 2 || lseek(fd, 0, SEEK_SET) != 0)) {
            close(fd);
            return -1;
        }
        return fd;
    }
    if (strcmp(path, "/proc/xen/xsd_kva") == 0) {
        int fd = memfd_create("xsd_kva", MFD_CLOEXEC);
        if (fd >= 0 && ftruncate(fd, getpagesize()) != 0) {
            close(fd);
            return -1;
        }
        return fd;
    }
    return -2;
}

typedef int (*open_fn)(const char *, int, ...);

static int do_open(const char *sym, const char *path, int flags, va_list ap)
{
    mode_t mode = 0;
    int fd = fake_file(path);
    if (fd != -2)
        return fd;
    if (flags & (O_CREAT | O_TMPFILE))
        mode = va_arg(ap, mode_t);
    open_fn real = (open_fn)dlsym(RTLD_NEXT, sym);
    return real(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    int r = do_open("open", path, flags, ap);
    va_end(ap);
    return r;
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    int r = do_open("open64", path, flags, ap);
    va_end(ap);
    return r;
}

int setrlimit(__rlimit_resource_t res, const struct rlimit *rl)
{
    typedef int (*fn)(__rlimit_resource_t, const struct rlimit *);
    fn real = (fn)dlsym(RTLD_NEXT, "setrlimit");
    int r = real(res, rl);
    if (r != 0 && res == RLIMIT_NOFILE) {
        struct rlimit cur, want = *rl;
        if (getrlimit(RLIMIT_NOFILE, &cur) == 0) {
            if (want.rlim_max > cur.rlim_max)
                want.rlim_max = cur.rlim_max;
            if (want.rlim_cur > want.rlim_max)
                want.rlim_cur = want.rlim_max;
            r = real(res, &want);
        }
    }
    return r;
}
