/* vddk_sim: a VixDiskLib-compatible library over local files.
 *
 * Exports the VixDiskLib_* symbols of ext/vixdisklib/vixdisklib.h with the
 * documented semantics, so vmrestore's bindings, its core VDDK writer and the
 * lab can run where VMware's library cannot be shipped. Behaviour, names and
 * environment variables are documented in docs/vddk.md ("vddk_sim"); in short:
 *
 *   VMRESTORE_VDDK_SIM_DATASTORES  "ds1=/dir,ds2=/dir": datastore -> directory
 *                                  (or key vmrestore.sim.datastores in the
 *                                  InitEx config file; the env var wins)
 *   VMRESTORE_VDDK_SIM_TRANSPORTS  modes the simulated host/proxy offer
 *                                  (default "san:hotadd:nbdssl:nbd")
 *   VMRESTORE_VDDK_SIM_FAIL        "op:N:code[,...]": the Nth op fails with code;
 *                                  "op:N+:code" fails the Nth and every later one
 *                                  (ops: connect open write read flush prepare end)
 *   VMRESTORE_VDDK_SIM_LATENCY_US  added to every read/write/flush request
 *   VMRESTORE_VDDK_SIM_WORKERS     async worker threads per disk handle (4)
 *   VMRESTORE_VDDK_SIM_TRACE       append one line per API call to this file
 *   VMRESTORE_VDDK_SIM_USER / _PASSWORD / _THUMBPRINT: when set, ConnectEx
 *                                  refuses other credentials / thumbprints
 *
 * Disk "[ds] dir/name.vmdk" is the data file DSDIR/dir/name-flat.vmdk (as on a
 * VMFS datastore and in the lab); the descriptor DSDIR/dir/name.vmdk, when it
 * has an "RW <sectors> ..." extent line, gives the capacity, else the flat
 * file's size does. Global state is only what the API itself makes global
 * (InitEx's loggers and config) plus the connect/prepare fault counters.
 *
 * Strict by default (VMRESTORE_VDDK_SIM_STRICT=0 relaxes), it holds its caller
 * to VMware's rules where a real VDDK would misbehave (docs/vddk.md, "The
 * stricter stand-in"):
 *   - InitEx loads the companion libvixDiskLibVim.so.8 by name: without the
 *     VDDK lib64 on the search path it fails (VixError 1, reason in the log);
 *   - InitEx from a thread other than the main thread fails;
 *   - NULL log functions + logging from two threads: abort (relaxed: a warning);
 *   - ConnectEx/Disconnect/Open/Close/PrepareForAccess/EndAccess/Cleanup running
 *     concurrently fail (VixError 1); NULL connect params are refused;
 *   VMRESTORE_VDDK_SIM_HOST=esx   an ESXi host: PrepareForAccess/EndAccess fail
 *                                  (VixError 6), as a host without vCenter does
 *   VMRESTORE_VDDK_SIM_NFC_MEMORY / _NFC_MAX_ALLOC  per-host NFC buffer pool
 *                                  (48 MiB) and largest allocation (2 MiB) for
 *                                  nbd/nbdssl: each request takes its bytes + 24
 *                                  (these three are read at Open)
 *   VMRESTORE_VDDK_SIM_CALLBACKS   thread (default) | inline (inside the submit
 *                                  call) | wait (only during Wait/Flush/Close)
 *   VMRESTORE_VDDK_SIM_SESSION_DELAY_US  time each session call holds (1000 when
 *                                  strict), so unserialized callers collide
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vixdisklib.h"

#define API __attribute__((visibility("default")))
#define SIM_PROTO(ret, name, params) API ret name params;
VMR_VIXDISKLIB_FUNCTIONS(SIM_PROTO, SIM_PROTO)

#define SECTOR VIXDISKLIB_SECTOR_SIZE
#define MAX_FAULTS 16
#define MAX_WORKERS 64
#define DEFAULT_MODES "san:hotadd:nbdssl:nbd"
#define COMPANION "libvixDiskLibVim.so.8"
#define NFC_HEADER 24           /* bytes an NFC write message adds to its data */
#define MAX_NFC_HOSTS 16
#define MAX_PREPARED 64

/* ---- global state the API implies ------------------------------------- */

static int g_initialized;
static VixDiskLibGenericLogFunc *g_log, *g_warn;
static char *g_config_file;
static void *g_companion;       /* dlopen handle of COMPANION */
static int g_strict = 1;        /* read at InitEx */
static pid_t g_log_tid;         /* NULL loggers: the first thread that logged */
static int g_busy;              /* session calls running now */

enum { CB_THREAD, CB_INLINE, CB_WAIT };

/* NFC buffer memory per host (nbd/nbdssl): what the host's NFC server can hold. */
struct nfc_host {
    char name[256];
    uint64_t used;
    uint64_t memory, max_alloc;  /* the pool and its largest allocation (read at Open) */
};
static struct nfc_host g_nfc[MAX_NFC_HOSTS];
static int g_nnfc;

/* VMs whose operations PrepareForAccess disabled (until EndAccess). */
static char *g_prepared[MAX_PREPARED];

/* Process-wide fault counters (ConnectEx and PrepareForAccess have no object to
 * count on): reset by InitEx and whenever VMRESTORE_VDDK_SIM_FAIL changes. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static char g_fail_spec[1024];
static unsigned long g_connects, g_prepares, g_ends;

static unsigned long global_count(unsigned long *counter)
{
    const char *spec = getenv("VMRESTORE_VDDK_SIM_FAIL");
    unsigned long n;
    pthread_mutex_lock(&g_mu);
    if (strncmp(spec ? spec : "", g_fail_spec, sizeof g_fail_spec) != 0) {
        snprintf(g_fail_spec, sizeof g_fail_spec, "%s", spec ? spec : "");
        g_connects = g_prepares = g_ends = 0;
    }
    n = ++*counter;
    pthread_mutex_unlock(&g_mu);
    return n;
}

/* ---- small helpers ------------------------------------------------------ */

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

/* VixDiskLib's default log functions (InitEx given NULL) are not thread-safe:
 * the first thread that logs through them owns them; another one aborts the
 * process when strict (a warning otherwise), where the real library would
 * corrupt its log state. */
static void default_logger(const char *fmt, va_list ap)
{
    pid_t me = my_tid(), owner = 0;
    (void)fmt;
    (void)ap;
    if (__atomic_compare_exchange_n(&g_log_tid, &owner, me, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST) || owner == me)
        return;
    fprintf(stderr, "vddk_sim: the default log functions (InitEx got NULL loggers) were "
            "called from two threads (%d and %d); they are not thread-safe\n", (int)owner,
            (int)me);
    if (g_strict)
        abort();
}

static void sim_log(int warn, const char *fmt, ...)
{
    VixDiskLibGenericLogFunc *fn = warn ? g_warn : g_log;
    va_list ap;
    va_start(ap, fmt);
    if (fn != NULL)
        fn(fmt, ap);
    else
        default_logger(fmt, ap);
    va_end(ap);
}

static void trace(const char *fmt, ...)
{
    const char *path = getenv("VMRESTORE_VDDK_SIM_TRACE");
    char line[1024];
    va_list ap;
    int n, fd;

    if (path == NULL || *path == '\0')
        return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, (size_t)n) < 0) { /* best effort */ }
    close(fd);
}

static char *sdup(const char *s) { return s ? strdup(s) : NULL; }

static void sleep_us(unsigned long us)
{
    struct timespec ts = { (time_t)(us / 1000000), (long)(us % 1000000) * 1000 };
    while (us && nanosleep(&ts, &ts) != 0 && errno == EINTR) { }
}

static unsigned long env_ulong(const char *name, unsigned long dflt)
{
    const char *v = getenv(name);
    char *end;
    unsigned long x;
    if (v == NULL || *v == '\0')
        return dflt;
    x = strtoul(v, &end, 10);
    return *end == '\0' ? x : dflt;
}

/* ---- VMware's threading rules ------------------------------------------------ */

/* ConnectEx, Disconnect, Open, Close and the access calls must not run
 * concurrently (VDDK initializes and tears down libraries in them). Each holds
 * the "session" for g_session_delay_us, so an unserialized caller collides. */
static VixError session_enter(const char *call)
{
    int prev = __atomic_fetch_add(&g_busy, 1, __ATOMIC_SEQ_CST);
    if (prev != 0 && g_strict) {
        __atomic_fetch_sub(&g_busy, 1, __ATOMIC_SEQ_CST);
        sim_log(1, "%s: called while another connect/open/close call runs in another "
                "thread; VixDiskLib requires these calls serialized\n", call);
        trace("%s refused: concurrent session call", call);
        return VIX_E_FAIL;
    }
    sleep_us(env_ulong("VMRESTORE_VDDK_SIM_SESSION_DELAY_US", g_strict ? 1000 : 0));
    return VIX_OK;
}

static void session_leave(void)
{
    __atomic_fetch_sub(&g_busy, 1, __ATOMIC_SEQ_CST);
}

/* The NFC pool of server (created on first use); NULL when the table is full. */
static struct nfc_host *nfc_host(const char *server)
{
    struct nfc_host *found = NULL;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < g_nnfc && !found; i++)
        if (strcmp(g_nfc[i].name, server) == 0)
            found = &g_nfc[i];
    if (!found && g_nnfc < MAX_NFC_HOSTS) {
        found = &g_nfc[g_nnfc++];
        snprintf(found->name, sizeof found->name, "%s", server);
        found->used = 0;
    }
    if (found) {
        found->memory = env_ulong("VMRESTORE_VDDK_SIM_NFC_MEMORY", 48ul << 20);
        found->max_alloc = env_ulong("VMRESTORE_VDDK_SIM_NFC_MAX_ALLOC", 2ul << 20);
    }
    pthread_mutex_unlock(&g_mu);
    return found;
}

/* Take bytes + NFC_HEADER from the host's pool, as the NFC server allocates a
 * message buffer; fails with the server's text when too large or exhausted. */
static VixError nfc_take(struct nfc_host *n, uint64_t bytes)
{
    uint64_t need = bytes + NFC_HEADER;
    int ok;
    if (n == NULL)
        return VIX_OK;
    pthread_mutex_lock(&g_mu);
    ok = need <= n->max_alloc && n->used + need <= n->memory;
    if (ok)
        n->used += need;
    pthread_mutex_unlock(&g_mu);
    if (ok)
        return VIX_OK;
    sim_log(1, "[NFC ERROR] NfcFssrvrProcessErrorMsg: received NFC error 5 from server: "
            "Failed to allocate the requested %llu bytes\n", (unsigned long long)need);
    trace("nfc refused %llu bytes on %s", (unsigned long long)need, n->name);
    return VIX_E_OUT_OF_MEMORY;
}

static void nfc_give(struct nfc_host *n, uint64_t bytes)
{
    if (n == NULL)
        return;
    pthread_mutex_lock(&g_mu);
    n->used -= bytes + NFC_HEADER;
    pthread_mutex_unlock(&g_mu);
}

/* ---- fault injection ------------------------------------------------------ */

struct fault {
    char op[16];
    unsigned long nth;
    int and_later;
    VixError code;
};

struct faults {
    struct fault f[MAX_FAULTS];
    int n;
};

static void faults_parse(struct faults *fs)
{
    const char *spec = getenv("VMRESTORE_VDDK_SIM_FAIL");
    char buf[1024], *save = NULL, *tok;

    fs->n = 0;
    if (spec == NULL || *spec == '\0')
        return;
    snprintf(buf, sizeof buf, "%s", spec);
    for (tok = strtok_r(buf, ",", &save); tok && fs->n < MAX_FAULTS;
         tok = strtok_r(NULL, ",", &save)) {
        struct fault *f = &fs->f[fs->n];
        char *c1 = strchr(tok, ':'), *c2, *end;
        if (c1 == NULL || (c2 = strchr(c1 + 1, ':')) == NULL)
            continue;
        *c1 = '\0';
        *c2 = '\0';
        snprintf(f->op, sizeof f->op, "%s", tok);
        f->nth = strtoul(c1 + 1, &end, 10);
        f->and_later = (*end == '+');
        f->code = strtoull(c2 + 1, NULL, 10);
        if (f->nth > 0 && f->code != VIX_OK)
            fs->n++;
    }
}

/* The error to inject for the count-th call of op (1-based), or VIX_OK. */
static VixError fault_check(const struct faults *fs, const char *op, unsigned long count)
{
    for (int i = 0; i < fs->n; i++) {
        const struct fault *f = &fs->f[i];
        if (strcmp(f->op, op) == 0 && (count == f->nth || (f->and_later && count > f->nth)))
            return f->code;
    }
    return VIX_OK;
}

/* ---- datastores ------------------------------------------------------------- */

/* Value of key in the InitEx config file (lines: name = "value"), malloc'd. */
static char *config_value(const char *key)
{
    FILE *fp;
    char line[2048];
    char *out = NULL;

    if (g_config_file == NULL || (fp = fopen(g_config_file, "re")) == NULL)
        return NULL;
    while (fgets(line, sizeof line, fp)) {
        char *p = line, *eq, *v, *e;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '#' || (eq = strchr(p, '=')) == NULL)
            continue;
        e = eq;
        while (e > p && isspace((unsigned char)e[-1]))
            e--;
        if ((size_t)(e - p) != strlen(key) || strncmp(p, key, (size_t)(e - p)) != 0)
            continue;
        v = eq + 1;
        while (isspace((unsigned char)*v) || *v == '"')
            v++;
        e = v + strlen(v);
        while (e > v && (isspace((unsigned char)e[-1]) || e[-1] == '"'))
            e--;
        free(out);
        out = strndup(v, (size_t)(e - v));
    }
    fclose(fp);
    return out;
}

/* Directory of datastore ds (malloc'd), or NULL when unknown. */
static char *datastore_dir(const char *ds, size_t dslen)
{
    const char *env = getenv("VMRESTORE_VDDK_SIM_DATASTORES");
    char *conf = NULL, *buf, *save = NULL, *tok, *out = NULL;

    if (env == NULL || *env == '\0')
        env = conf = config_value("vmrestore.sim.datastores");
    if (env == NULL)
        return NULL;
    buf = strdup(env);
    free(conf);
    if (buf == NULL)
        return NULL;
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        while (isspace((unsigned char)*tok))
            tok++;
        if (eq && (size_t)(eq - tok) == dslen && strncmp(tok, ds, dslen) == 0) {
            out = strdup(eq + 1);
            break;
        }
    }
    free(buf);
    return out;
}

/* ---- connection ------------------------------------------------------------- */

struct VixDiskLibConnectParam {
    int local;            /* no server: paths are local file names */
    int read_only;
    char *server;
    char *vmx;
    char *modes;          /* requested transport list, colon separated */
    unsigned long opens;  /* Open calls, for fault injection */
    struct faults faults;
};

static int mode_known(const char *m, size_t n)
{
    static const char *known[] = { "file", "san", "hotadd", "nbd", "nbdssl" };
    for (size_t i = 0; i < sizeof known / sizeof *known; i++)
        if (strlen(known[i]) == n && strncmp(known[i], m, n) == 0)
            return 1;
    return 0;
}

/* ---- disk handle ------------------------------------------------------------ */

struct request {
    struct request *next;
    int is_write;
    uint64_t start, count;  /* sectors */
    uint8_t *rbuf;
    const uint8_t *wbuf;
    VixDiskLibCompletionCB cb;
    void *cb_data;
};

struct VixDiskLibHandleStruct {
    int fd;
    int read_only;
    uint64_t capacity;    /* sectors */
    char mode[16];
    char *data_path;
    char *uuid;
    VixDiskLibAdapterType adapter;
    struct faults faults;
    unsigned long latency_us;
    struct nfc_host *nfc;  /* nbd/nbdssl: the host's NFC pool; NULL otherwise */
    int async_logged;
    int cb_mode;           /* CB_*: where completions are called (read at Open) */

    pthread_mutex_t mu;
    pthread_cond_t work;  /* a request queued, or stop */
    pthread_cond_t idle;  /* pending dropped to zero */
    struct request *head, *tail;
    unsigned long pending;  /* queued + running async requests */
    unsigned long writes, reads, flushes;
    int stop;
    int nworkers;
    pthread_t workers[MAX_WORKERS];
};

/* Parse the descriptor for capacity (RW line), adapter and uuid. */
static void read_descriptor(const char *path, uint64_t *capacity,
                            VixDiskLibAdapterType *adapter, char **uuid)
{
    FILE *fp = fopen(path, "re");
    char line[1024];
    struct stat st;

    if (fp == NULL)
        return;
    if (fstat(fileno(fp), &st) != 0 || st.st_size > 64 * 1024) {
        fclose(fp);  /* not a descriptor: a monolithic image or data */
        return;
    }
    while (fgets(line, sizeof line, fp)) {
        unsigned long long sectors;
        char val[256];
        if (sscanf(line, "RW %llu", &sectors) == 1)
            *capacity += sectors;
        else if (sscanf(line, "ddb.adapterType = \"%255[^\"]\"", val) == 1) {
            if (strcmp(val, "ide") == 0)
                *adapter = VIXDISKLIB_ADAPTER_IDE;
            else if (strcmp(val, "buslogic") == 0)
                *adapter = VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC;
        } else if (sscanf(line, "ddb.uuid = \"%255[^\"]\"", val) == 1) {
            free(*uuid);
            *uuid = strdup(val);
        }
    }
    fclose(fp);
}

/* "[ds] dir/x.vmdk" (or a local path) -> data file path and descriptor path. */
static VixError resolve_path(const struct VixDiskLibConnectParam *c, const char *path,
                             char **data, char **desc)
{
    char *full = NULL, *flat = NULL;
    size_t n;

    if (c->local) {
        full = strdup(path);
    } else {
        const char *close_br, *rel;
        char *dir;
        if (path[0] != '[' || (close_br = strchr(path, ']')) == NULL)
            return VIX_E_INVALID_ARG;
        dir = datastore_dir(path + 1, (size_t)(close_br - path - 1));
        if (dir == NULL)
            return VIX_E_OBJECT_NOT_FOUND;
        rel = close_br + 1;
        while (*rel == ' ')
            rel++;
        if (asprintf(&full, "%s/%s", dir, rel) < 0)
            full = NULL;
        free(dir);
    }
    if (full == NULL)
        return VIX_E_OUT_OF_MEMORY;
    n = strlen(full);
    if (n > 5 && strcmp(full + n - 5, ".vmdk") == 0 &&
        !(n > 10 && strcmp(full + n - 10, "-flat.vmdk") == 0)) {
        if (asprintf(&flat, "%.*s-flat.vmdk", (int)(n - 5), full) < 0)
            flat = NULL;
        if (flat && access(flat, F_OK) == 0) {
            *data = flat;
            *desc = full;
            return VIX_OK;
        }
        free(flat);
    }
    *data = full;
    *desc = NULL;
    return VIX_OK;
}

static int is_thick(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_size > 0 &&
           (uint64_t)st.st_blocks * 512 >= (uint64_t)st.st_size;
}

/* 1 if the colon-separated list contains exactly name. */
static int list_has(const char *list, const char *name)
{
    size_t len = strlen(name);
    while (*list) {
        size_t n = strcspn(list, ":");
        if (n == len && strncmp(list, name, n) == 0)
            return 1;
        list += n + (list[n] == ':');
    }
    return 0;
}

/* Pick the first requested mode the simulated environment allows for this disk:
 * file only for local connections; san only for thick disks; hotadd only with a
 * vmxSpec (it attaches the disk to a VM); nbd/nbdssl whenever offered. */
static int choose_mode(const struct VixDiskLibConnectParam *c, int fd, char *out, size_t cap)
{
    const char *offered = getenv("VMRESTORE_VDDK_SIM_TRANSPORTS");
    const char *p = c->modes;

    if (c->local) {
        snprintf(out, cap, "file");
        return 0;
    }
    if (offered == NULL || *offered == '\0')
        offered = DEFAULT_MODES;
    while (*p) {
        size_t n = strcspn(p, ":");
        char m[16];
        snprintf(m, sizeof m, "%.*s", (int)(n < 15 ? n : 15), p);
        p += n + (p[n] == ':');
        if (strcmp(m, "file") == 0 || !list_has(offered, m))
            continue;
        if (strcmp(m, "san") == 0 && !is_thick(fd))
            continue;
        if (strcmp(m, "hotadd") == 0 && c->vmx == NULL)
            continue;
        snprintf(out, cap, "%s", m);
        return 0;
    }
    return -1;
}

/* One synchronous I/O against the data file. */
static VixError do_io(struct VixDiskLibHandleStruct *h, int is_write, uint64_t start,
                      uint64_t count, uint8_t *rbuf, const uint8_t *wbuf)
{
    uint64_t off = start * SECTOR, len = count * SECTOR, done = 0;
    unsigned long nth;
    VixError err;

    if (start > h->capacity || count > h->capacity - start)
        return VIX_E_DISK_OUTOFRANGE;
    if (is_write && h->read_only)
        return VIX_E_FILE_READ_ONLY;
    pthread_mutex_lock(&h->mu);
    nth = is_write ? ++h->writes : ++h->reads;
    pthread_mutex_unlock(&h->mu);
    if (h->latency_us)
        sleep_us(h->latency_us);
    err = fault_check(&h->faults, is_write ? "write" : "read", nth);
    if (err != VIX_OK) {
        trace("fault %s #%lu sector=%llu code=%llu", is_write ? "write" : "read", nth,
              (unsigned long long)start, (unsigned long long)err);
        return err;
    }
    while (done < len) {
        ssize_t r = is_write ? pwrite(h->fd, wbuf + done, len - done, (off_t)(off + done))
                             : pread(h->fd, rbuf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == ENOSPC ? VIX_E_DISK_FULL : VIX_E_FILE_ERROR;
        }
        if (r == 0) {
            if (is_write)
                return VIX_E_FILE_ERROR;
            memset(rbuf + done, 0, len - done);  /* past the data file's end: zeros */
            break;
        }
        done += (uint64_t)r;
    }
    return VIX_OK;
}

/* One async request: the I/O, its NFC buffer back, the completion callback. The
 * library logs from the thread that completes it, as VDDK does. */
static void run_request(struct VixDiskLibHandleStruct *h, struct request *r)
{
    VixError err = do_io(h, r->is_write, r->start, r->count, r->rbuf, r->wbuf);
    nfc_give(h->nfc, r->count * SECTOR);
    if (!__atomic_exchange_n(&h->async_logged, 1, __ATOMIC_SEQ_CST))
        sim_log(0, "vddk_sim: async I/O running on %s\n", h->data_path);
    if (err != VIX_OK)
        sim_log(1, "vddk_sim: %s of %llu sectors at sector %llu failed (VixError %llu)\n",
                r->is_write ? "write" : "read", (unsigned long long)r->count,
                (unsigned long long)r->start, (unsigned long long)err);
    if (r->cb)
        r->cb(r->cb_data, err);
    free(r);
}

/* Run the queued requests (h->mu held; it is released around each one). With
 * wait_for_work, sleep for more until the handle stops (a worker thread); without,
 * return once the queue is empty (mode "wait": the thread calling Wait runs them). */
static void drain_queue(struct VixDiskLibHandleStruct *h, int wait_for_work)
{
    for (;;) {
        struct request *r;
        while (wait_for_work && h->head == NULL && !h->stop)
            pthread_cond_wait(&h->work, &h->mu);
        if (h->head == NULL)
            return;
        r = h->head;
        h->head = r->next;
        if (h->head == NULL)
            h->tail = NULL;
        pthread_mutex_unlock(&h->mu);
        run_request(h, r);
        pthread_mutex_lock(&h->mu);
        if (--h->pending == 0)
            pthread_cond_broadcast(&h->idle);
    }
}

static void *worker_main(void *arg)
{
    struct VixDiskLibHandleStruct *h = arg;
    pthread_mutex_lock(&h->mu);
    drain_queue(h, 1);
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

static void run_queue(struct VixDiskLibHandleStruct *h)
{
    pthread_mutex_lock(&h->mu);
    drain_queue(h, 0);
    pthread_mutex_unlock(&h->mu);
}

static VixError submit(VixDiskLibHandle h, int is_write, uint64_t start, uint64_t count,
                       uint8_t *rbuf, const uint8_t *wbuf, VixDiskLibCompletionCB cb,
                       void *cb_data)
{
    struct request *r;
    VixError err;

    if (h == NULL || cb == NULL || (is_write ? wbuf == NULL : rbuf == NULL))
        return VIX_E_INVALID_ARG;
    if (start > h->capacity || count > h->capacity - start)
        return VIX_E_DISK_OUTOFRANGE;
    if (is_write && h->read_only)
        return VIX_E_FILE_READ_ONLY;
    if ((err = nfc_take(h->nfc, count * SECTOR)) != VIX_OK)
        return err;
    if ((r = calloc(1, sizeof *r)) == NULL) {
        nfc_give(h->nfc, count * SECTOR);
        return VIX_E_OUT_OF_MEMORY;
    }
    r->is_write = is_write;
    r->start = start;
    r->count = count;
    r->rbuf = rbuf;
    r->wbuf = wbuf;
    r->cb = cb;
    r->cb_data = cb_data;

    if (h->cb_mode == CB_INLINE) {  /* completed, callback called, before we return */
        run_request(h, r);
        return VIX_ASYNC;
    }
    pthread_mutex_lock(&h->mu);
    if (h->nworkers == 0 && h->cb_mode == CB_THREAD) {  /* start the workers on first use */
        unsigned long want = env_ulong("VMRESTORE_VDDK_SIM_WORKERS", 4);
        if (want < 1)
            want = 1;
        if (want > MAX_WORKERS)
            want = MAX_WORKERS;
        while ((unsigned long)h->nworkers < want &&
               pthread_create(&h->workers[h->nworkers], NULL, worker_main, h) == 0)
            h->nworkers++;
        if (h->nworkers == 0) {
            pthread_mutex_unlock(&h->mu);
            free(r);
            return VIX_E_OUT_OF_MEMORY;
        }
    }
    if (h->tail)
        h->tail->next = r;
    else
        h->head = r;
    h->tail = r;
    h->pending++;
    pthread_cond_signal(&h->work);
    pthread_mutex_unlock(&h->mu);
    return VIX_ASYNC;
}

static void wait_idle(VixDiskLibHandle h)
{
    if (h->cb_mode == CB_WAIT)
        run_queue(h);
    pthread_mutex_lock(&h->mu);
    while (h->pending > 0)
        pthread_cond_wait(&h->idle, &h->mu);
    pthread_mutex_unlock(&h->mu);
}

static int has_pending(VixDiskLibHandle h)
{
    unsigned long p;
    pthread_mutex_lock(&h->mu);
    p = h->pending;
    pthread_mutex_unlock(&h->mu);
    return p != 0;
}

/* A synchronous read/write: its NFC buffer is held for the call. */
static VixError sync_io(VixDiskLibHandle h, int is_write, uint64_t start, uint64_t count,
                        uint8_t *rbuf, const uint8_t *wbuf)
{
    VixError err = nfc_take(h->nfc, count * SECTOR);
    if (err != VIX_OK)
        return err;
    err = do_io(h, is_write, start, count, rbuf, wbuf);
    nfc_give(h->nfc, count * SECTOR);
    return err;
}

/* ---- the API ---------------------------------------------------------------- */

VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                           VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                           VixDiskLibGenericLogFunc *panic, const char *libDir,
                           const char *configFile)
{
    int (*vim_version)(void);

    (void)panic;
    (void)libDir;
    g_strict = env_ulong("VMRESTORE_VDDK_SIM_STRICT", 1) != 0;
    g_log = log;
    g_warn = warn;
    g_log_tid = 0;
    if (g_strict && my_tid() != getpid()) {
        sim_log(1, "VixDiskLib_InitEx: called from a thread other than the main thread\n");
        trace("VixDiskLib_InitEx refused: not the main thread");
        return VIX_E_FAIL;
    }
    /* VMware's library loads its companions by name: only the search path finds them. */
    if (g_companion == NULL && (g_companion = dlopen(COMPANION, RTLD_NOW)) == NULL) {
        sim_log(1, "VixDiskLib: Failed to load %s: %s\n", COMPANION, dlerror());
        trace("VixDiskLib_InitEx failed: %s not found", COMPANION);
        return VIX_E_FAIL;
    }
    vim_version = (int (*)(void))dlsym(g_companion, "VixDiskLibVim_Version");
    if (vim_version == NULL || vim_version() != 8) {
        sim_log(1, "VixDiskLib: %s is not the companion of this library\n", COMPANION);
        return VIX_E_FAIL;
    }
    free(g_config_file);
    g_config_file = sdup(configFile);
    pthread_mutex_lock(&g_mu);
    g_connects = g_prepares = g_ends = 0;
    g_nnfc = 0;
    pthread_mutex_unlock(&g_mu);
    g_initialized = 1;
    trace("VixDiskLib_InitEx %u.%u LD_LIBRARY_PATH=%s", majorVersion, minorVersion,
          getenv("LD_LIBRARY_PATH") ? getenv("LD_LIBRARY_PATH") : "");
    sim_log(0, "vddk_sim: initialized (API %u.%u)\n", majorVersion, minorVersion);
    return VIX_OK;
}

void VixDiskLib_Exit(void)
{
    trace("VixDiskLib_Exit");
    free(g_config_file);
    g_config_file = NULL;
    g_initialized = 0;
    g_log = g_warn = NULL;
    if (g_companion != NULL) {
        dlclose(g_companion);
        g_companion = NULL;
    }
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_PREPARED; i++) {
        free(g_prepared[i]);
        g_prepared[i] = NULL;
    }
    pthread_mutex_unlock(&g_mu);
}

const char *VixDiskLib_ListTransportModes(void)
{
    return "file:" DEFAULT_MODES;
}

VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *connectParams,
                            uint32_t *numCleanedUp, uint32_t *numRemaining)
{
    VixError err = session_enter("VixDiskLib_Cleanup");
    if (err != VIX_OK)
        return err;
    trace("VixDiskLib_Cleanup server=%s",
          connectParams && connectParams->serverName ? connectParams->serverName : "-");
    if (numCleanedUp)
        *numCleanedUp = 0;
    if (numRemaining)
        *numRemaining = 0;
    session_leave();
    return VIX_OK;
}

static VixError connect_ex(const VixDiskLibConnectParams *p, Bool readOnly,
                           const char *snapshotRef, const char *transportModes,
                           VixDiskLibConnection *connection);

VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, Bool readOnly,
                              const char *snapshotRef, const char *transportModes,
                              VixDiskLibConnection *connection)
{
    VixError err = session_enter("VixDiskLib_ConnectEx");
    if (err != VIX_OK)
        return err;
    err = connect_ex(p, readOnly, snapshotRef, transportModes, connection);
    session_leave();
    return err;
}

static VixError connect_ex(const VixDiskLibConnectParams *p, Bool readOnly,
                              const char *snapshotRef, const char *transportModes,
                              VixDiskLibConnection *connection)
{
    struct VixDiskLibConnectParam *c;
    const char *want_user = getenv("VMRESTORE_VDDK_SIM_USER");
    const char *want_pw = getenv("VMRESTORE_VDDK_SIM_PASSWORD");
    const char *want_tp = getenv("VMRESTORE_VDDK_SIM_THUMBPRINT");
    const char *modes = transportModes ? transportModes : DEFAULT_MODES;
    struct faults fs;
    VixError err;

    (void)snapshotRef;
    if (connection == NULL)
        return VIX_E_INVALID_ARG;
    *connection = NULL;
    if (!g_initialized)
        return VIX_E_FAIL;
    if (g_strict && p == NULL) {
        sim_log(1, "VixDiskLib_ConnectEx: connectParams is NULL (pass zeroed params for "
                "local files)\n");
        return VIX_E_INVALID_ARG;
    }
    if (p != NULL && p->specType != VIXDISKLIB_SPEC_VMX &&
        p->specType != VIXDISKLIB_SPEC_VSTORAGE_OBJECT)
        return VIX_E_INVALID_ARG;
    faults_parse(&fs);
    err = fault_check(&fs, "connect", global_count(&g_connects));
    if (err != VIX_OK) {
        trace("VixDiskLib_ConnectEx fault code=%llu", (unsigned long long)err);
        return err;
    }
    for (const char *m = modes; *m;) {
        size_t n = strcspn(m, ":");
        if (n == 0 || !mode_known(m, n))
            return VIX_E_INVALID_ARG;
        m += n + (m[n] == ':');
    }
    if (p != NULL && p->serverName != NULL) {
        if (p->credType != VIXDISKLIB_CRED_UID && p->credType != VIXDISKLIB_CRED_SESSIONID)
            return VIX_E_INVALID_ARG;
        if (p->credType == VIXDISKLIB_CRED_UID) {
            const char *u = p->creds.uid.userName, *pw = p->creds.uid.password;
            if (u == NULL || pw == NULL)
                return VIX_E_INVALID_ARG;
            if ((want_user && strcmp(want_user, u) != 0) ||
                (want_pw && strcmp(want_pw, pw) != 0))
                return VIX_E_AUTHENTICATION_FAIL;
        }
        if (want_tp && (p->thumbPrint == NULL || strcasecmp(want_tp, p->thumbPrint) != 0))
            return VIX_E_NET_HTTP_SSL_SECURITY;
    }
    if ((c = calloc(1, sizeof *c)) == NULL)
        return VIX_E_OUT_OF_MEMORY;
    c->local = (p == NULL || p->serverName == NULL);
    c->read_only = readOnly != 0;
    c->server = sdup(c->local ? NULL : p->serverName);
    c->vmx = sdup(p && p->vmxSpec && *p->vmxSpec ? p->vmxSpec : NULL);
    c->modes = strdup(modes);
    c->faults = fs;
    if (c->modes == NULL) {
        free(c->server);
        free(c->vmx);
        free(c);
        return VIX_E_OUT_OF_MEMORY;
    }
    *connection = c;
    trace("VixDiskLib_ConnectEx server=%s vmx=%s modes=%s ro=%d", c->server ? c->server : "-",
          c->vmx ? c->vmx : "-", c->modes, c->read_only);
    return VIX_OK;
}

VixError VixDiskLib_Disconnect(VixDiskLibConnection connection)
{
    VixError err;
    if (connection == NULL)
        return VIX_E_INVALID_ARG;
    if ((err = session_enter("VixDiskLib_Disconnect")) != VIX_OK)
        return err;
    trace("VixDiskLib_Disconnect");
    free(connection->server);
    free(connection->vmx);
    free(connection->modes);
    free(connection);
    session_leave();
    return VIX_OK;
}

/* The slot of vmx in g_prepared (g_mu held), or -1. */
static int prepared_slot(const char *vmx)
{
    for (int i = 0; i < MAX_PREPARED; i++)
        if (g_prepared[i] && strcmp(g_prepared[i], vmx) == 0)
            return i;
    return -1;
}

/* PrepareForAccess (prepare=1) / EndAccess: vCenter disables (re-enables) the
 * VM's relocation methods. A host has no such service; a VM already disabled
 * (a session that never called EndAccess) is refused until EndAccess. */
static VixError access_call(const char *name, const VixDiskLibConnectParams *p,
                            const char *identity, int prepare)
{
    const char *host = getenv("VMRESTORE_VDDK_SIM_HOST");
    VixError err = VIX_OK;
    int slot;

    if (p == NULL || p->vmxSpec == NULL || identity == NULL)
        return VIX_E_INVALID_ARG;
    if (host && strcmp(host, "esx") == 0) {
        sim_log(1, "%s: %s is an ESXi host; disabling VM methods needs vCenter Server\n",
                name, p->serverName ? p->serverName : "the server");
        trace("%s vmx=%s refused: esx host", name, p->vmxSpec);
        return VIX_E_NOT_SUPPORTED;
    }
    pthread_mutex_lock(&g_mu);
    slot = prepared_slot(p->vmxSpec);
    if (prepare && slot >= 0) {
        err = VIX_E_OBJECT_IS_BUSY;
    } else if (prepare) {
        for (int i = 0; i < MAX_PREPARED; i++)
            if (g_prepared[i] == NULL) {
                g_prepared[i] = strdup(p->vmxSpec);
                break;
            }
    } else if (slot >= 0) {
        free(g_prepared[slot]);
        g_prepared[slot] = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    if (err != VIX_OK) {
        sim_log(1, "%s: the methods of %s are already disabled (a session did not call "
                "EndAccess)\n", name, p->vmxSpec);
        trace("%s vmx=%s refused: already disabled", name, p->vmxSpec);
        return err;
    }
    trace("%s vmx=%s identity=%s", name, p->vmxSpec, identity);
    return VIX_OK;
}

/* An access call as the API sees it: its injected fault, the session rule, the work. */
static VixError access_entry(const char *name, const char *op, unsigned long *counter,
                             const VixDiskLibConnectParams *p, const char *identity,
                             int prepare)
{
    struct faults fs;
    VixError err;
    faults_parse(&fs);
    if ((err = fault_check(&fs, op, global_count(counter))) != VIX_OK) {
        trace("%s fault code=%llu", name, (unsigned long long)err);
        return err;
    }
    if ((err = session_enter(name)) != VIX_OK)
        return err;
    err = access_call(name, p, identity, prepare);
    session_leave();
    return err;
}

VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                     const char *identity)
{
    return access_entry("VixDiskLib_PrepareForAccess", "prepare", &g_prepares, connectParams,
                        identity, 1);
}

VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams,
                              const char *identity)
{
    return access_entry("VixDiskLib_EndAccess", "end", &g_ends, connectParams, identity, 0);
}

static VixError open_disk(const VixDiskLibConnection connection, const char *path,
                          uint32_t flags, VixDiskLibHandle *diskHandle);

VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                         uint32_t flags, VixDiskLibHandle *diskHandle)
{
    VixError err = session_enter("VixDiskLib_Open");
    if (err != VIX_OK)
        return err;
    err = open_disk(connection, path, flags, diskHandle);
    session_leave();
    return err;
}

static VixError open_disk(const VixDiskLibConnection connection, const char *path,
                          uint32_t flags, VixDiskLibHandle *diskHandle)
{
    struct VixDiskLibHandleStruct *h;
    char *data = NULL, *desc = NULL;
    struct stat st;
    VixError err;
    int ro;

    if (connection == NULL || path == NULL || diskHandle == NULL)
        return VIX_E_INVALID_ARG;
    *diskHandle = NULL;
    err = fault_check(&connection->faults, "open",
                      __atomic_add_fetch(&connection->opens, 1, __ATOMIC_SEQ_CST));
    if (err == VIX_OK)
        err = resolve_path(connection, path, &data, &desc);
    if (err != VIX_OK) {
        trace("VixDiskLib_Open path=%s result=%llu", path, (unsigned long long)err);
        return err;
    }
    if ((h = calloc(1, sizeof *h)) == NULL) {
        free(data);
        free(desc);
        return VIX_E_OUT_OF_MEMORY;
    }
    ro = connection->read_only || (flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY);
    h->fd = open(data, (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (h->fd < 0) {
        err = errno == ENOENT ? VIX_E_FILE_NOT_FOUND
            : (errno == EACCES || errno == EROFS) ? VIX_E_FILE_ACCESS_ERROR : VIX_E_FILE_ERROR;
        goto fail;
    }
    if (fstat(h->fd, &st) != 0) {
        err = VIX_E_FILE_ERROR;
        goto fail;
    }
    h->read_only = ro;
    h->adapter = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    if (desc)
        read_descriptor(desc, &h->capacity, &h->adapter, &h->uuid);
    if (h->capacity == 0)
        h->capacity = (uint64_t)st.st_size / SECTOR;
    if (choose_mode(connection, h->fd, h->mode, sizeof h->mode) != 0) {
        err = VIX_E_NOT_SUPPORTED;  /* no requested transport mode is usable */
        goto fail;
    }
    h->data_path = data;
    h->faults = connection->faults;
    if (strcmp(h->mode, "nbd") == 0 || strcmp(h->mode, "nbdssl") == 0)
        h->nfc = nfc_host(connection->server);
    {
        const char *cb = getenv("VMRESTORE_VDDK_SIM_CALLBACKS");
        h->cb_mode = cb && strcmp(cb, "inline") == 0 ? CB_INLINE
                   : cb && strcmp(cb, "wait") == 0 ? CB_WAIT : CB_THREAD;
    }
    h->latency_us = env_ulong("VMRESTORE_VDDK_SIM_LATENCY_US", 0);
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->work, NULL);
    pthread_cond_init(&h->idle, NULL);
    free(desc);
    *diskHandle = h;
    trace("VixDiskLib_Open path=%s mode=%s capacity=%llu ro=%d flags=%u", path, h->mode,
          (unsigned long long)h->capacity, h->read_only, flags);
    sim_log(0, "vddk_sim: opened %s with transport %s\n", path, h->mode);
    return VIX_OK;

fail:
    trace("VixDiskLib_Open path=%s result=%llu", path, (unsigned long long)err);
    if (h->fd >= 0)
        close(h->fd);
    free(h->uuid);
    free(h);
    free(data);
    free(desc);
    return err;
}

VixError VixDiskLib_Close(VixDiskLibHandle h)
{
    VixError err;
    if (h == NULL)
        return VIX_E_INVALID_ARG;
    if ((err = session_enter("VixDiskLib_Close")) != VIX_OK)
        return err;
    wait_idle(h);
    pthread_mutex_lock(&h->mu);
    h->stop = 1;
    pthread_cond_broadcast(&h->work);
    pthread_mutex_unlock(&h->mu);
    for (int i = 0; i < h->nworkers; i++)
        pthread_join(h->workers[i], NULL);
    trace("VixDiskLib_Close writes=%lu reads=%lu", h->writes, h->reads);
    close(h->fd);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->work);
    pthread_cond_destroy(&h->idle);
    sim_log(0, "vddk_sim: closed %s\n", h->data_path);
    free(h->data_path);
    free(h->uuid);
    free(h);
    session_leave();
    return VIX_OK;
}

VixError VixDiskLib_GetInfo(VixDiskLibHandle h, VixDiskLibInfo **info)
{
    VixDiskLibInfo *i;
    uint64_t cyl;

    if (h == NULL || info == NULL)
        return VIX_E_INVALID_ARG;
    if ((i = calloc(1, sizeof *i)) == NULL)
        return VIX_E_OUT_OF_MEMORY;
    i->capacity = h->capacity;
    i->adapterType = h->adapter;
    i->numLinks = 1;
    i->uuid = sdup(h->uuid);
    i->logicalSectorSize = SECTOR;
    i->physicalSectorSize = SECTOR;
    /* The usual virtual geometry: 255 heads, 63 sectors per track. */
    cyl = h->capacity / (255 * 63);
    i->biosGeo.heads = i->physGeo.heads = 255;
    i->biosGeo.sectors = i->physGeo.sectors = 63;
    i->biosGeo.cylinders = i->physGeo.cylinders = (uint32_t)(cyl > 65535 ? 65535 : cyl);
    *info = i;
    return VIX_OK;
}

void VixDiskLib_FreeInfo(VixDiskLibInfo *info)
{
    if (info == NULL)
        return;
    free(info->parentFileNameHint);
    free(info->uuid);
    free(info);
}

const char *VixDiskLib_GetTransportMode(VixDiskLibHandle h)
{
    return h ? h->mode : NULL;
}

VixError VixDiskLib_Read(VixDiskLibHandle h, VixDiskLibSectorType startSector,
                         VixDiskLibSectorType numSectors, uint8_t *readBuffer)
{
    if (h == NULL || readBuffer == NULL)
        return VIX_E_INVALID_ARG;
    if (has_pending(h))
        return VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED;
    return sync_io(h, 0, startSector, numSectors, readBuffer, NULL);
}

VixError VixDiskLib_Write(VixDiskLibHandle h, VixDiskLibSectorType startSector,
                          VixDiskLibSectorType numSectors, const uint8_t *writeBuffer)
{
    if (h == NULL || writeBuffer == NULL)
        return VIX_E_INVALID_ARG;
    if (has_pending(h))
        return VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED;
    return sync_io(h, 1, startSector, numSectors, NULL, writeBuffer);
}

#ifndef VDDK_SIM_LEGACY /* -DVDDK_SIM_LEGACY: only the calls VDDK 5.5 had */
VixError VixDiskLib_ReadAsync(VixDiskLibHandle h, VixDiskLibSectorType startSector,
                              VixDiskLibSectorType numSectors, uint8_t *readBuffer,
                              VixDiskLibCompletionCB callback, void *cbData)
{
    return submit(h, 0, startSector, numSectors, readBuffer, NULL, callback, cbData);
}

VixError VixDiskLib_WriteAsync(VixDiskLibHandle h, VixDiskLibSectorType startSector,
                               VixDiskLibSectorType numSectors, const uint8_t *writeBuffer,
                               VixDiskLibCompletionCB callback, void *cbData)
{
    return submit(h, 1, startSector, numSectors, NULL, writeBuffer, callback, cbData);
}

VixError VixDiskLib_Wait(VixDiskLibHandle h)
{
    if (h == NULL)
        return VIX_E_INVALID_ARG;
    wait_idle(h);
    return VIX_OK;
}

VixError VixDiskLib_Flush(VixDiskLibHandle h)
{
    unsigned long nth;
    VixError err;

    if (h == NULL)
        return VIX_E_INVALID_ARG;
    wait_idle(h);
    pthread_mutex_lock(&h->mu);
    nth = ++h->flushes;
    pthread_mutex_unlock(&h->mu);
    if (h->latency_us)
        sleep_us(h->latency_us);
    if ((err = fault_check(&h->faults, "flush", nth)) != VIX_OK) {
        trace("fault flush #%lu code=%llu", nth, (unsigned long long)err);
        return err;
    }
    if (!h->read_only && fdatasync(h->fd) != 0)
        return VIX_E_FILE_ERROR;
    trace("VixDiskLib_Flush");
    return VIX_OK;
}

VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle h, VixDiskLibSectorType startSector,
                                         VixDiskLibSectorType numSectors,
                                         VixDiskLibSectorType chunkSize,
                                         VixDiskLibBlockList **blockList)
{
    VixDiskLibBlockList *list = NULL;
    uint32_t cap = 16, n = 0;
    uint64_t pos, end;
    struct stat st;

    if (h == NULL || blockList == NULL || chunkSize < VIXDISKLIB_MIN_CHUNK_SIZE ||
        startSector % chunkSize != 0 || numSectors % chunkSize != 0)
        return VIX_E_INVALID_ARG;
    if (startSector > h->capacity || numSectors > h->capacity - startSector)
        return VIX_E_DISK_OUTOFRANGE;
    if (numSectors / chunkSize > VIXDISKLIB_MAX_CHUNK_NUMBER)
        return VIX_E_INVALID_ARG;
    if (fstat(h->fd, &st) != 0)
        return VIX_E_FILE_ERROR;
    list = malloc(sizeof *list + cap * sizeof(VixDiskLibBlock));
    if (list == NULL)
        return VIX_E_OUT_OF_MEMORY;

    pos = startSector * SECTOR;
    end = (startSector + numSectors) * SECTOR;
    if (end > (uint64_t)st.st_size)
        end = (uint64_t)st.st_size;  /* past the data file's end nothing is allocated */
    while (pos < end) {
        off_t d = lseek(h->fd, (off_t)pos, SEEK_DATA), hole;
        uint64_t cs = chunkSize * SECTOR, a, b;
        if (d < 0 || (uint64_t)d >= end)
            break;
        hole = lseek(h->fd, d, SEEK_HOLE);
        if (hole < 0 || (uint64_t)hole > end)
            hole = (off_t)end;
        a = (uint64_t)d / cs * cs;                        /* round out to chunks */
        b = ((uint64_t)hole + cs - 1) / cs * cs;
        if (b > (startSector + numSectors) * SECTOR)
            b = (startSector + numSectors) * SECTOR;
        if (n > 0 && list->blocks[n - 1].offset + list->blocks[n - 1].length >= a / SECTOR) {
            list->blocks[n - 1].length = b / SECTOR - list->blocks[n - 1].offset;
        } else {
            if (n == cap) {
                VixDiskLibBlockList *bigger;
                cap *= 2;
                bigger = realloc(list, sizeof *list + cap * sizeof(VixDiskLibBlock));
                if (bigger == NULL) {
                    free(list);
                    return VIX_E_OUT_OF_MEMORY;
                }
                list = bigger;
            }
            list->blocks[n].offset = a / SECTOR;
            list->blocks[n].length = (b - a) / SECTOR;
            n++;
        }
        pos = b;
    }
    list->numBlocks = n;
    *blockList = list;
    return VIX_OK;
}

VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList)
{
    free(blockList);
    return VIX_OK;
}

VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void)
{
    return calloc(1, sizeof(VixDiskLibConnectParams));
}

#endif /* VDDK_SIM_LEGACY */

void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *p)
{
    free(p);  /* strings in it belong to the caller */
}

static const struct { VixError code; const char *text; } error_texts[] = {
    { VIX_OK, "The operation was successful" },
    { VIX_E_FAIL, "Unknown error" },
    { VIX_E_OUT_OF_MEMORY, "Memory allocation failed. Out of memory." },
    { VIX_E_INVALID_ARG, "One of the parameters was invalid" },
    { VIX_E_FILE_NOT_FOUND, "The file was not found" },
    { VIX_E_OBJECT_IS_BUSY, "This object is busy" },
    { VIX_E_NOT_SUPPORTED, "The operation is not supported" },
    { VIX_E_FILE_ERROR, "A file access error occurred on the host or guest operating system" },
    { VIX_E_DISK_FULL, "An error occurred while writing a file; the disk is full" },
    { VIX_E_FILE_READ_ONLY, "The file is write-protected" },
    { VIX_E_FILE_ACCESS_ERROR, "You do not have access rights to this file" },
    { VIX_E_FILE_ALREADY_LOCKED, "The file is already in use" },
    { VIX_E_OBJECT_NOT_FOUND, "The object was not found" },
    { VIX_E_HOST_NOT_CONNECTED, "The host is not connected" },
    { VIX_E_AUTHENTICATION_FAIL, "Authentication failed" },
    { VIX_E_HOST_CONNECTION_LOST, "The connection to the host was lost" },
    { VIX_E_INVALID_HANDLE, "The handle is not a valid VIX object" },
    { VIX_E_VM_NOT_FOUND, "The virtual machine cannot be found" },
    { VIX_E_HOST_TCP_CONN_LOST, "The TCP connection to the host was lost" },
    { VIX_E_DISK_INVAL, "An invalid disk was specified" },
    { VIX_E_DISK_NOIO, "Disk I/O failed" },
    { VIX_E_DISK_OUTOFRANGE, "The specified sector is out of range" },
    { VIX_E_DISK_CAPACITY_MISMATCH, "The disk capacity does not match" },
    { VIX_ASYNC, "The operation completes asynchronously" },
    { VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED,
      "Synchronous and asynchronous I/O cannot be mixed on one disk handle" },
    { VIX_E_NET_HTTP_SSL_SECURITY, "SSL security error: the server's thumbprint does not match" },
};

char *VixDiskLib_GetErrorText(VixError err, const char *locale)
{
    VixError code = err & 0xFFFF;
    (void)locale;
    for (size_t i = 0; i < sizeof error_texts / sizeof *error_texts; i++)
        if (error_texts[i].code == code)
            return strdup(error_texts[i].text);
    return strdup("Unknown error");
}

void VixDiskLib_FreeErrorText(char *errMsg)
{
    free(errMsg);
}
