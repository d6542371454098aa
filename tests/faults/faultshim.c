/* An LD_PRELOAD shim that makes the Nth write-type file operation under one folder fail, the way SQLite's I/O
 * error tests do: so a test can prove that a stage survives ENOSPC, EIO or SIGKILL at every write it performs.
 *
 * Environment (nothing happens without EDGETL_FAULT_DIR and EDGETL_FAULT_COUNTER):
 *   EDGETL_FAULT_DIR      only operations on paths strictly inside this folder count (its real path is used);
 *   EDGETL_FAULT_COUNTER  a file of at least 4096 bytes, mapped MAP_SHARED: the operation counter that every
 *                         process of a run shares (children inherit the environment and map the same file), so
 *                         converters, benchmark children and training workers count in one sequence;
 *   EDGETL_FAULT_AT       the 1-based operation to fail; 0 or unset: count only;
 *   EDGETL_FAULT_MODE     enospc, eio or kill;
 *   EDGETL_FAULT_LOG      optional file: one tab-separated line per counted operation: sequence number, pid,
 *                         time, operation, outcome (ok, FAULT-ENOSPC, FAULT-EIO, KILL, FULL-ENOSPC), path, second
 *                         path (a rename's destination; empty otherwise);
 *   EDGETL_FAULT_WRITES   first (default): a data write counts once per open file, on its first write;
 *                         all: every write call counts (large files then give many points).
 *
 * Fault semantics:
 *   enospc: the chosen operation fails with ENOSPC, and from then on the disk stays full for every process of the
 *           run: each later operation that needs space (creating a file or folder, a write, a truncate, fallocate,
 *           a link) fails with ENOSPC too. Removing files, renaming and opening existing files still work, as on a
 *           real full disk, so a stage can still clean up after itself.
 *   eio:    the chosen operation fails with EIO, once (a transient device error); everything after it works.
 *   kill:   the process that performs the chosen operation gets SIGKILL before the operation happens.
 *
 * Counted operations: open/openat/creat (and their 64-bit, fortified and stdio forms, mkstemp) for writing or
 * creating; rename/renameat/renameat2; mkdir/mkdirat; unlink/unlinkat/rmdir; link/linkat/symlink/symlinkat;
 * truncate/ftruncate; fallocate/posix_fallocate; fsync/fdatasync; and data writes (write, pwrite, writev,
 * pwritev, sendfile, copy_file_range, fwrite) on descriptors whose file lies inside the folder. Not counted:
 * close (its errors are not data loss on local disks), metadata changes (chmod, utime), stores into a memory
 * mapping, stdio output other than fwrite, and anything done with raw system calls.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 65536
#define PATH_BUF (PATH_MAX * 2)

enum { FD_UNKNOWN = 0, FD_OUTSIDE = 1, FD_INSIDE = 2, FD_INSIDE_WRITTEN = 3 };
enum { MODE_COUNT = 0, MODE_ENOSPC = 1, MODE_EIO = 2, MODE_KILL = 3 };

struct shared {
    int64_t count;      /* operations counted so far, all processes */
    int32_t fired;      /* 1 once the chosen operation was reached */
    int32_t fired_pid;  /* the process that reached it */
    int64_t failed;     /* operations that failed because of the fault (the chosen one and a full disk's later ones) */
};

static int ready = 0;   /* 1: active; -1: inactive */
static char fault_dir[PATH_MAX];
static size_t fault_dir_len;
static struct shared *counter;
static int64_t fail_at;
static int mode;
static int count_all_writes;
static const char *log_path;
static unsigned char fd_state[MAX_FDS];

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

static int (*raw_open)(const char *, int, ...);
static ssize_t (*raw_write)(int, const void *, size_t);
static int (*raw_close)(int);

static void init(void) {
    static int starting = 0;  /* dlsym may allocate, and an allocator may open files: no recursion */
    if (ready || starting) return;
    starting = 1;
    raw_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    raw_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    raw_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    const char *dir = getenv("EDGETL_FAULT_DIR");
    const char *path = getenv("EDGETL_FAULT_COUNTER");
    if (!dir || !*dir || !path || !*path || !raw_open || !raw_write || !raw_close || !realpath(dir, fault_dir)) {
        ready = -1;
        return;
    }
    fault_dir_len = strlen(fault_dir);
    int fd = raw_open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        ready = -1;
        return;
    }
    void *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    raw_close(fd);
    if (map == MAP_FAILED) {
        ready = -1;
        return;
    }
    counter = (struct shared *)map;
    const char *at = getenv("EDGETL_FAULT_AT");
    fail_at = at ? strtoll(at, NULL, 10) : 0;
    const char *how = getenv("EDGETL_FAULT_MODE");
    mode = !how ? MODE_COUNT : !strcmp(how, "enospc") ? MODE_ENOSPC : !strcmp(how, "eio") ? MODE_EIO
         : !strcmp(how, "kill") ? MODE_KILL : MODE_COUNT;
    if (mode == MODE_COUNT) fail_at = 0;
    const char *writes = getenv("EDGETL_FAULT_WRITES");
    count_all_writes = writes && !strcmp(writes, "all");
    log_path = getenv("EDGETL_FAULT_LOG");
    if (log_path && !*log_path) log_path = NULL;
    ready = 1;
}

__attribute__((constructor)) static void shim_start(void) { init(); }

/* ------------------------------------------------------------------------------------------- path resolution */

/* Fold "." and ".." of an absolute path in place (used only where the parent folder does not exist yet). */
static void fold(char *path) {
    char out[PATH_BUF];
    size_t len = 0;
    const char *p = path;
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *end = strchr(p, '/');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 1 && p[0] == '.') {
        } else if (n == 2 && p[0] == '.' && p[1] == '.') {
            while (len > 0 && out[len - 1] != '/') len--;
            if (len > 0) len--;
        } else if (len + n + 2 < sizeof out) {
            out[len++] = '/';
            memcpy(out + len, p, n);
            len += n;
        }
        p += n;
    }
    if (len == 0) out[len++] = '/';
    out[len] = 0;
    memcpy(path, out, len + 1);
}

/* The absolute path `path` names (relative to `dirfd`), with every folder above its last part resolved. */
static int resolve(int dirfd, const char *path, char *out) {
    char full[PATH_BUF];
    if (!path || !*path) return -1;
    if (path[0] == '/') {
        snprintf(full, sizeof full, "%s", path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base)) return -1;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n <= 0) return -1;
            base[n] = 0;
        }
        snprintf(full, sizeof full, "%s/%s", base, path);
    }
    size_t len = strlen(full);
    while (len > 1 && full[len - 1] == '/') full[--len] = 0;
    char *slash = strrchr(full, '/');
    const char *name = slash + 1;
    if (!strcmp(name, ".") || !strcmp(name, "..") || slash == full) {
        if (!realpath(full, out)) {
            snprintf(out, PATH_BUF, "%s", full);
            fold(out);
        }
        return 0;
    }
    *slash = 0;
    char parent[PATH_MAX];
    if (realpath(full, parent)) {
        snprintf(out, PATH_BUF, "%s/%s", strcmp(parent, "/") ? parent : "", name);
    } else {
        *slash = '/';
        snprintf(out, PATH_BUF, "%s", full);
        fold(out);
    }
    return 0;
}

static int inside(const char *resolved) {
    return !strncmp(resolved, fault_dir, fault_dir_len) && resolved[fault_dir_len] == '/';
}

/* Whether `path` (relative to `dirfd`) lies inside the fault folder; `out` gets its resolved form. */
static int path_inside(int dirfd, const char *path, char *out) {
    if (ready != 1) return 0;
    int saved = errno;
    int yes = resolve(dirfd, path, out) == 0 && inside(out);
    errno = saved;
    return yes;
}

/* Whether descriptor `fd` names a file inside the fault folder (asks /proc; `out` gets the path). */
static int fd_inside(int fd, char *out) {
    if (ready != 1 || fd < 0) return 0;
    int saved = errno;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_BUF - 1);
    errno = saved;
    if (n <= 0) return 0;
    out[n] = 0;
    return inside(out);
}

static void set_state(int fd, int state) {
    if (fd >= 0 && fd < MAX_FDS) fd_state[fd] = (unsigned char)state;
}

/* ------------------------------------------------------------------------------------------- the decision */

static void log_line(int64_t seq, const char *op, const char *outcome, const char *path, const char *path2) {
    if (!log_path) return;
    char line[PATH_BUF * 2 + 160];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int n = snprintf(line, sizeof line, "%lld\t%d\t%lld.%03ld\t%s\t%s\t%s\t%s\n", (long long)seq, (int)getpid(),
                     (long long)now.tv_sec, now.tv_nsec / 1000000, op, outcome, path, path2 ? path2 : "");
    if (n <= 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    int saved = errno;
    int fd = raw_open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t ignored = raw_write(fd, line, (size_t)n);
        (void)ignored;
        raw_close(fd);
    }
    errno = saved;
}

/* Count one operation inside the folder; returns 0 to let it happen, or the errno it must fail with.
 * `allocating`: the operation needs free space (it fails on a disk that a fault filled). */
static int decide(const char *op, const char *path, const char *path2, int allocating) {
    int64_t seq = __atomic_add_fetch(&counter->count, 1, __ATOMIC_SEQ_CST);
    if (fail_at > 0 && seq == fail_at) {
        __atomic_store_n(&counter->fired_pid, (int32_t)getpid(), __ATOMIC_SEQ_CST);
        __atomic_store_n(&counter->fired, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&counter->failed, 1, __ATOMIC_SEQ_CST);
        if (mode == MODE_KILL) {
            log_line(seq, op, "KILL", path, path2);
            kill(getpid(), SIGKILL);
            for (;;) pause();
        }
        log_line(seq, op, mode == MODE_ENOSPC ? "FAULT-ENOSPC" : "FAULT-EIO", path, path2);
        return mode == MODE_ENOSPC ? ENOSPC : EIO;
    }
    if (mode == MODE_ENOSPC && allocating && __atomic_load_n(&counter->fired, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(&counter->failed, 1, __ATOMIC_SEQ_CST);
        log_line(seq, op, "FULL-ENOSPC", path, path2);
        return ENOSPC;
    }
    log_line(seq, op, "ok", path, path2);
    return 0;
}

/* A data operation on a descriptor: 0 to let it happen, or the errno it must fail with. `data`: a write whose
 * count follows EDGETL_FAULT_WRITES; otherwise (truncate, fallocate, fsync) every call counts. */
static int fd_decide(int fd, const char *op, int data) {
    if (ready != 1 || fd < 0) return 0;
    int state = fd < MAX_FDS ? fd_state[fd] : FD_UNKNOWN;
    if (state == FD_OUTSIDE) return 0;
    int full = mode == MODE_ENOSPC && __atomic_load_n(&counter->fired, __ATOMIC_SEQ_CST);
    int later = data && !count_all_writes && state == FD_INSIDE_WRITTEN;
    if (later && !full) return 0;  /* a later write of a file already written: not a new point */
    char path[PATH_BUF];
    if (!fd_inside(fd, path)) {  /* an unknown descriptor (inherited, or made by a call not seen here) */
        set_state(fd, FD_OUTSIDE);
        return 0;
    }
    if (later) {  /* not a new point, but a full disk refuses it too */
        __atomic_add_fetch(&counter->failed, 1, __ATOMIC_SEQ_CST);
        return ENOSPC;
    }
    if (data) set_state(fd, FD_INSIDE_WRITTEN);
    else if (state == FD_UNKNOWN) set_state(fd, FD_INSIDE);
    return decide(op, path, NULL, 1);
}

static int writes_file(int flags) {
    return (flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC | O_APPEND));
}

static int needs_mode(int flags) { return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE; }

/* ------------------------------------------------------------------------------------------- opening */

static int open_common(const char *op, int dirfd, const char *path, int flags, mode_t mode_bits,
                       int (*call)(int, const char *, int, mode_t)) {
    init();
    char resolved[PATH_BUF];
    int counted = writes_file(flags) && path_inside(dirfd, path, resolved);
    if (counted) {
        int err = decide(op, resolved, NULL, (flags & O_CREAT) != 0);
        if (err) {
            errno = err;
            return -1;
        }
    }
    int fd = call(dirfd, path, flags, mode_bits);
    if (fd >= 0) set_state(fd, counted ? FD_INSIDE : FD_OUTSIDE);
    return fd;
}

static int call_open(int dirfd, const char *path, int flags, mode_t m) {
    (void)dirfd;
    REAL(open);
    return real_open(path, flags, m);
}
static int call_open64(int dirfd, const char *path, int flags, mode_t m) {
    (void)dirfd;
    REAL(open64);
    return real_open64(path, flags, m);
}
static int call_openat(int dirfd, const char *path, int flags, mode_t m) {
    REAL(openat);
    return real_openat(dirfd, path, flags, m);
}
static int call_openat64(int dirfd, const char *path, int flags, mode_t m) {
    REAL(openat64);
    return real_openat64(dirfd, path, flags, m);
}

int open(const char *path, int flags, ...) {
    mode_t m = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        m = va_arg(ap, mode_t);
        va_end(ap);
    }
    return open_common("open", AT_FDCWD, path, flags, m, call_open);
}

int open64(const char *path, int flags, ...) {
    mode_t m = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        m = va_arg(ap, mode_t);
        va_end(ap);
    }
    return open_common("open", AT_FDCWD, path, flags, m, call_open64);
}

int openat(int dirfd, const char *path, int flags, ...) {
    mode_t m = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        m = va_arg(ap, mode_t);
        va_end(ap);
    }
    return open_common("openat", dirfd, path, flags, m, call_openat);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    mode_t m = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        m = va_arg(ap, mode_t);
        va_end(ap);
    }
    return open_common("openat", dirfd, path, flags, m, call_openat64);
}

int __open_2(const char *path, int flags) { return open_common("open", AT_FDCWD, path, flags, 0, call_open); }
int __open64_2(const char *path, int flags) { return open_common("open", AT_FDCWD, path, flags, 0, call_open64); }
int __openat_2(int dirfd, const char *path, int flags) {
    return open_common("openat", dirfd, path, flags, 0, call_openat);
}
int __openat64_2(int dirfd, const char *path, int flags) {
    return open_common("openat", dirfd, path, flags, 0, call_openat64);
}

int creat(const char *path, mode_t m) {
    return open_common("creat", AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, m, call_open);
}
int creat64(const char *path, mode_t m) {
    return open_common("creat", AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, m, call_open64);
}

static int stdio_writes(const char *how) { return how && (strchr(how, 'w') || strchr(how, 'a') || strchr(how, '+')); }

static FILE *fopen_common(const char *op, const char *path, const char *how, FILE *(*call)(const char *, const char *)) {
    init();
    char resolved[PATH_BUF];
    int counted = stdio_writes(how) && path_inside(AT_FDCWD, path, resolved);
    if (counted) {
        int err = decide(op, resolved, NULL, strchr(how, 'w') || strchr(how, 'a'));
        if (err) {
            errno = err;
            return NULL;
        }
    }
    FILE *stream = call(path, how);
    if (stream) set_state(fileno(stream), counted ? FD_INSIDE : FD_OUTSIDE);
    return stream;
}

static FILE *call_fopen(const char *path, const char *how) {
    REAL(fopen);
    return real_fopen(path, how);
}
static FILE *call_fopen64(const char *path, const char *how) {
    REAL(fopen64);
    return real_fopen64(path, how);
}

FILE *fopen(const char *path, const char *how) { return fopen_common("fopen", path, how, call_fopen); }
FILE *fopen64(const char *path, const char *how) { return fopen_common("fopen", path, how, call_fopen64); }

FILE *freopen(const char *path, const char *how, FILE *stream) {
    init();
    REAL(freopen);
    char resolved[PATH_BUF];
    if (stream) set_state(fileno(stream), FD_UNKNOWN);
    int counted = path && stdio_writes(how) && path_inside(AT_FDCWD, path, resolved);
    if (counted) {
        int err = decide("freopen", resolved, NULL, strchr(how, 'w') || strchr(how, 'a'));
        if (err) {
            errno = err;
            return NULL;
        }
    }
    FILE *again = real_freopen(path, how, stream);
    if (again) set_state(fileno(again), counted ? FD_INSIDE : FD_UNKNOWN);
    return again;
}

static int mkstemp_common(char *template, int flags, int suffix, int which) {
    init();
    char resolved[PATH_BUF];
    int counted = path_inside(AT_FDCWD, template, resolved);
    if (counted) {
        int err = decide("mkstemp", resolved, NULL, 1);
        if (err) {
            errno = err;
            return -1;
        }
    }
    int fd;
    if (which == 0) {
        REAL(mkstemp);
        fd = real_mkstemp(template);
    } else if (which == 1) {
        REAL(mkostemp);
        fd = real_mkostemp(template, flags);
    } else if (which == 2) {
        REAL(mkstemps);
        fd = real_mkstemps(template, suffix);
    } else {
        REAL(mkostemps);
        fd = real_mkostemps(template, suffix, flags);
    }
    if (fd >= 0) set_state(fd, counted ? FD_INSIDE : FD_OUTSIDE);
    return fd;
}

int mkstemp(char *template) { return mkstemp_common(template, 0, 0, 0); }
int mkstemp64(char *template) { return mkstemp_common(template, 0, 0, 0); }
int mkostemp(char *template, int flags) { return mkstemp_common(template, flags, 0, 1); }
int mkostemp64(char *template, int flags) { return mkstemp_common(template, flags, 0, 1); }
int mkstemps(char *template, int suffix) { return mkstemp_common(template, 0, suffix, 2); }
int mkostemps(char *template, int suffix, int flags) { return mkstemp_common(template, flags, suffix, 3); }

/* ------------------------------------------------------------------------------------------- names */

/* Count a name operation when `path` (or `path2`) lies inside the folder; 0 to go on, else -1 with errno set. */
static int name_op(const char *op, int dirfd, const char *path, int dirfd2, const char *path2, int allocating) {
    init();
    char first[PATH_BUF], second[PATH_BUF];
    int one = path && path_inside(dirfd, path, first);
    int two = path2 && path_inside(dirfd2, path2, second);
    if (!one && !two) return 0;
    if (!one && path && resolve(dirfd, path, first) != 0) snprintf(first, sizeof first, "%s", path);
    int err = decide(op, first, path2 ? (two ? second : path2) : NULL, allocating);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

int rename(const char *from, const char *to) {
    REAL(rename);
    if (name_op("rename", AT_FDCWD, from, AT_FDCWD, to, 0)) return -1;
    return real_rename(from, to);
}

int renameat(int fromfd, const char *from, int tofd, const char *to) {
    REAL(renameat);
    if (name_op("renameat", fromfd, from, tofd, to, 0)) return -1;
    return real_renameat(fromfd, from, tofd, to);
}

int renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned int flags) {
    REAL(renameat2);
    if (name_op(flags & RENAME_EXCHANGE ? "renameat2-exchange" : "renameat2", fromfd, from, tofd, to, 0)) return -1;
    return real_renameat2(fromfd, from, tofd, to, flags);
}

int mkdir(const char *path, mode_t m) {
    REAL(mkdir);
    if (name_op("mkdir", AT_FDCWD, path, AT_FDCWD, NULL, 1)) return -1;
    return real_mkdir(path, m);
}

int mkdirat(int dirfd, const char *path, mode_t m) {
    REAL(mkdirat);
    if (name_op("mkdirat", dirfd, path, AT_FDCWD, NULL, 1)) return -1;
    return real_mkdirat(dirfd, path, m);
}

int unlink(const char *path) {
    REAL(unlink);
    if (name_op("unlink", AT_FDCWD, path, AT_FDCWD, NULL, 0)) return -1;
    return real_unlink(path);
}

int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat);
    if (name_op(flags & AT_REMOVEDIR ? "unlinkat-dir" : "unlinkat", dirfd, path, AT_FDCWD, NULL, 0)) return -1;
    return real_unlinkat(dirfd, path, flags);
}

int rmdir(const char *path) {
    REAL(rmdir);
    if (name_op("rmdir", AT_FDCWD, path, AT_FDCWD, NULL, 0)) return -1;
    return real_rmdir(path);
}

int link(const char *from, const char *to) {
    REAL(link);
    if (name_op("link", AT_FDCWD, to, AT_FDCWD, NULL, 1)) return -1;
    return real_link(from, to);
}

int linkat(int fromfd, const char *from, int tofd, const char *to, int flags) {
    REAL(linkat);
    if (name_op("linkat", tofd, to, AT_FDCWD, NULL, 1)) return -1;
    return real_linkat(fromfd, from, tofd, to, flags);
}

int symlink(const char *target, const char *path) {
    REAL(symlink);
    if (name_op("symlink", AT_FDCWD, path, AT_FDCWD, NULL, 1)) return -1;
    return real_symlink(target, path);
}

int symlinkat(const char *target, int dirfd, const char *path) {
    REAL(symlinkat);
    if (name_op("symlinkat", dirfd, path, AT_FDCWD, NULL, 1)) return -1;
    return real_symlinkat(target, dirfd, path);
}

int truncate(const char *path, off_t length) {
    REAL(truncate);
    if (name_op("truncate", AT_FDCWD, path, AT_FDCWD, NULL, 1)) return -1;
    return real_truncate(path, length);
}

int truncate64(const char *path, off64_t length) {
    REAL(truncate64);
    if (name_op("truncate", AT_FDCWD, path, AT_FDCWD, NULL, 1)) return -1;
    return real_truncate64(path, length);
}

/* ------------------------------------------------------------------------------------------- descriptors */

#define FD_GUARD(fd, op, data, failed)          \
    do {                                        \
        init();                                 \
        int err_ = fd_decide((fd), (op), (data)); \
        if (err_) {                             \
            errno = err_;                       \
            return (failed);                    \
        }                                       \
    } while (0)

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write);
    if (n) FD_GUARD(fd, "write", 1, -1);
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t offset) {
    REAL(pwrite);
    if (n) FD_GUARD(fd, "pwrite", 1, -1);
    return real_pwrite(fd, buf, n, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t offset) {
    REAL(pwrite64);
    if (n) FD_GUARD(fd, "pwrite", 1, -1);
    return real_pwrite64(fd, buf, n, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    REAL(writev);
    FD_GUARD(fd, "writev", 1, -1);
    return real_writev(fd, iov, count);
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t offset) {
    REAL(pwritev);
    FD_GUARD(fd, "pwritev", 1, -1);
    return real_pwritev(fd, iov, count, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int count, off64_t offset) {
    REAL(pwritev64);
    FD_GUARD(fd, "pwritev", 1, -1);
    return real_pwritev64(fd, iov, count, offset);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int count, off_t offset, int flags) {
    REAL(pwritev2);
    FD_GUARD(fd, "pwritev", 1, -1);
    return real_pwritev2(fd, iov, count, offset, flags);
}

ssize_t sendfile(int out, int in, off_t *offset, size_t n) {
    REAL(sendfile);
    if (n) FD_GUARD(out, "sendfile", 1, -1);
    return real_sendfile(out, in, offset, n);
}

ssize_t sendfile64(int out, int in, off64_t *offset, size_t n) {
    REAL(sendfile64);
    if (n) FD_GUARD(out, "sendfile", 1, -1);
    return real_sendfile64(out, in, offset, n);
}

ssize_t copy_file_range(int in, off64_t *in_offset, int out, off64_t *out_offset, size_t n, unsigned int flags) {
    REAL(copy_file_range);
    if (n) FD_GUARD(out, "copy_file_range", 1, -1);
    return real_copy_file_range(in, in_offset, out, out_offset, n, flags);
}

size_t fwrite(const void *buf, size_t size, size_t count, FILE *stream) {
    REAL(fwrite);
    if (size && count) FD_GUARD(fileno(stream), "fwrite", 1, 0);
    return real_fwrite(buf, size, count, stream);
}

int ftruncate(int fd, off_t length) {
    REAL(ftruncate);
    FD_GUARD(fd, "ftruncate", 0, -1);
    return real_ftruncate(fd, length);
}

int ftruncate64(int fd, off64_t length) {
    REAL(ftruncate64);
    FD_GUARD(fd, "ftruncate", 0, -1);
    return real_ftruncate64(fd, length);
}

int fallocate(int fd, int how, off_t offset, off_t length) {
    REAL(fallocate);
    FD_GUARD(fd, "fallocate", 0, -1);
    return real_fallocate(fd, how, offset, length);
}

int fallocate64(int fd, int how, off64_t offset, off64_t length) {
    REAL(fallocate64);
    FD_GUARD(fd, "fallocate", 0, -1);
    return real_fallocate64(fd, how, offset, length);
}

/* posix_fallocate reports its error as the return value, not in errno. */
int posix_fallocate(int fd, off_t offset, off_t length) {
    REAL(posix_fallocate);
    init();
    int err = fd_decide(fd, "posix_fallocate", 0);
    return err ? err : real_posix_fallocate(fd, offset, length);
}

int posix_fallocate64(int fd, off64_t offset, off64_t length) {
    REAL(posix_fallocate64);
    init();
    int err = fd_decide(fd, "posix_fallocate", 0);
    return err ? err : real_posix_fallocate64(fd, offset, length);
}

int fsync(int fd) {
    REAL(fsync);
    FD_GUARD(fd, "fsync", 0, -1);
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    FD_GUARD(fd, "fdatasync", 0, -1);
    return real_fdatasync(fd);
}

/* ------------------------------------------------------------------------------------------- bookkeeping */

int close(int fd) {
    REAL(close);
    set_state(fd, FD_UNKNOWN);
    return real_close(fd);
}

int fclose(FILE *stream) {
    REAL(fclose);
    if (stream) set_state(fileno(stream), FD_UNKNOWN);
    return real_fclose(stream);
}

static void copy_state(int from, int to, int result) {
    if (result >= 0 && from >= 0 && from < MAX_FDS) set_state(result, fd_state[from]);
    else if (to >= 0) set_state(to, FD_UNKNOWN);
}

int dup(int fd) {
    REAL(dup);
    int result = real_dup(fd);
    copy_state(fd, result, result);
    return result;
}

int dup2(int fd, int to) {
    REAL(dup2);
    int result = real_dup2(fd, to);
    copy_state(fd, to, result);
    return result;
}

int dup3(int fd, int to, int flags) {
    REAL(dup3);
    int result = real_dup3(fd, to, flags);
    copy_state(fd, to, result);
    return result;
}
