/* Local writers: a regular file or block device (HotAdd), and a raw LUN at
 * the physical extents of a disk (SAN). Both write with O_DIRECT where the
 * file system allows it and fall back to buffered I/O (saying why in note).
 * Lanes share the writer's descriptors: pwrite/fallocate are thread-safe. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "writer.h"

#define ZCHUNK (1u << 20)

/* One target device or file: the shared I/O part of the file and SAN writers. */
struct fio {
    int fd_direct;          /* O_DIRECT descriptor, or -1 */
    int fd;                 /* buffered descriptor (always open) */
    int is_blk;
    int punch_ok, zero_range_ok, blkzero_ok;  /* learnt at run time; racy but monotone */
    uint64_t size;
    const char *path;
    unsigned char *zeros;   /* ZCHUNK aligned zeros for the fallback */
    int created;            /* this open created the file (O_CREAT | O_EXCL) */
    uint64_t dev, ino;      /* its identity, when created */
};

static int fio_open(struct fio *f, const char *path, uint64_t want, uint32_t flags, char *note,
                    size_t note_len, struct vmr_error *err)
{
    memset(f, 0, sizeof *f);
    f->fd = f->fd_direct = -1;
    f->path = path;
    struct stat st;
    int exists = stat(path, &st) == 0;
    if (!exists && errno != ENOENT) {
        vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (exists && S_ISBLK(st.st_mode)) {
        f->is_blk = 1;
    } else if (exists && S_ISREG(st.st_mode)) {
        if (!(flags & VMR_FILE_FORCE)) {
            vmr_error_set(err, VMR_E_TARGET, EEXIST, UINT64_MAX,
                          "%s exists (use --force to overwrite it)", path);
            return -1;
        }
    } else if (exists) {
        vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX,
                      "%s is neither a regular file nor a block device", path);
        return -1;
    } else if (!(flags & VMR_FILE_CREATE)) {
        vmr_error_set(err, VMR_E_TARGET, ENOENT, UINT64_MAX, "%s does not exist", path);
        return -1;
    }
    int oflags = O_WRONLY | O_CLOEXEC;
    if (!exists)
        oflags |= O_CREAT | O_EXCL;
    f->fd = open(path, oflags, 0644);
    if (f->fd < 0) {
        vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: cannot open for writing: %s",
                      path, strerror(errno));
        return -1;
    }
    if (f->is_blk) {
        uint64_t bytes = 0;
        if (ioctl(f->fd, BLKGETSIZE64, &bytes) != 0) {
            vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: BLKGETSIZE64: %s", path,
                          strerror(errno));
            goto fail;
        }
        f->size = bytes;
        f->blkzero_ok = 1;
    } else {
        struct stat cst;
        if (!exists && fstat(f->fd, &cst) == 0) {
            f->created = 1;
            f->dev = (uint64_t)cst.st_dev;
            f->ino = (uint64_t)cst.st_ino;
        }
        if (!exists && ftruncate(f->fd, (off_t)want) != 0) {
            vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: cannot size to %llu: %s",
                          path, (unsigned long long)want, strerror(errno));
            goto fail;
        }
        struct stat st2;
        fstat(f->fd, &st2);
        f->size = (uint64_t)st2.st_size;
        f->punch_ok = f->zero_range_ok = 1;
    }
    if (f->size < want) {
        vmr_error_set(err, VMR_E_TARGET, 0, UINT64_MAX,
                      "%s holds %llu bytes, smaller than the disk (%llu bytes): refused", path,
                      (unsigned long long)f->size, (unsigned long long)want);
        goto fail;
    }
    if (!(flags & VMR_FILE_NO_DIRECT)) {
        f->fd_direct = open(path, O_WRONLY | O_CLOEXEC | O_DIRECT);
        if (f->fd_direct < 0)
            snprintf(note, note_len, "%s: O_DIRECT not available (%s): buffered writes", path,
                     strerror(errno));
    } else {
        snprintf(note, note_len, "%s: O_DIRECT disabled by option: buffered writes", path);
    }
    if (posix_memalign((void **)&f->zeros, VMR_ALIGN, ZCHUNK) != 0) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        goto fail;
    }
    memset(f->zeros, 0, ZCHUNK);
    return 0;
fail:
    if (f->fd >= 0)
        close(f->fd);
    if (f->fd_direct >= 0)
        close(f->fd_direct);
    f->fd = f->fd_direct = -1;
    if (f->created)  /* only the file this open created (O_EXCL), never a racer's */
        unlink(path);
    return -1;
}

static void fio_close(struct fio *f)
{
    if (f->fd_direct >= 0)
        close(f->fd_direct);
    if (f->fd >= 0)
        close(f->fd);
    free(f->zeros);
    f->fd = f->fd_direct = -1;
}

static int fio_pwrite(struct fio *f, const void *buf, uint32_t count, uint64_t off,
                      struct vmr_error *err)
{
    int fd = f->fd;
    /* O_DIRECT needs aligned buffer/offset/length (4 KiB is safe on every device) */
    if (f->fd_direct >= 0 && ((uintptr_t)buf % VMR_ALIGN) == 0 && off % 4096 == 0 &&
        count % 4096 == 0)
        fd = f->fd_direct;
    size_t done = 0;
    while (done < count) {
        ssize_t k = pwrite(fd, (const char *)buf + done, count - done, (off_t)(off + done));
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EINVAL && fd == f->fd_direct) {
            fd = f->fd;  /* device with a larger logical block size: buffered */
            continue;
        }
        if (k <= 0) {
            int e = k < 0 ? errno : EIO;
            vmr_error_set(err, VMR_E_TARGET, e, off + done,
                          "%s: write of %u bytes at offset %llu failed: %s", f->path, count,
                          (unsigned long long)(off + done), strerror(e));
            return -1;
        }
        done += (size_t)k;
    }
    return 0;
}

static int fio_write_zeros(struct fio *f, uint64_t count, uint64_t off, struct vmr_error *err)
{
    while (count > 0) {
        uint32_t k = count > ZCHUNK ? ZCHUNK : (uint32_t)count;
        if (fio_pwrite(f, f->zeros, k, off, err) != 0)
            return -1;
        off += k;
        count -= k;
    }
    return 0;
}

static int fio_zero(struct fio *f, uint64_t count, uint64_t off, uint32_t flags,
                    struct vmr_error *err)
{
    if (f->is_blk) {
        if (__atomic_load_n(&f->blkzero_ok, __ATOMIC_RELAXED) && off % 512 == 0 &&
            count % 512 == 0) {
            uint64_t range[2] = {off, count};
            if (ioctl(f->fd, BLKZEROOUT, range) == 0)
                return 0;
            if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL) {
                vmr_error_set(err, VMR_E_TARGET, errno, off,
                              "%s: BLKZEROOUT of %llu bytes at offset %llu failed: %s",
                              f->path, (unsigned long long)count, (unsigned long long)off,
                              strerror(errno));
                return -1;
            }
            __atomic_store_n(&f->blkzero_ok, 0, __ATOMIC_RELAXED);
        }
        return fio_write_zeros(f, count, off, err);
    }
    if ((flags & VMR_F_MAY_TRIM) && __atomic_load_n(&f->punch_ok, __ATOMIC_RELAXED)) {
        if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                      (off_t)count) == 0)
            return 0;
        __atomic_store_n(&f->punch_ok, 0, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&f->zero_range_ok, __ATOMIC_RELAXED)) {
        if (fallocate(f->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                      (off_t)count) == 0)
            return 0;
        __atomic_store_n(&f->zero_range_ok, 0, __ATOMIC_RELAXED);
    }
    return fio_write_zeros(f, count, off, err);
}

static int fio_flush(struct fio *f, struct vmr_error *err)
{
    if (fsync(f->fd) != 0 || (f->fd_direct >= 0 && fsync(f->fd_direct) != 0)) {
        vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: fsync failed: %s", f->path,
                      strerror(errno));
        return -1;
    }
    return 0;
}

/* -------------------------------------------------------------- read side
 * The compare stage of a quick rollback (compare.c) reads what the target
 * holds now. A read handle is its own pair of read-only descriptors: O_DIRECT
 * when aligned (a hot-added disk's loop device must not answer from a cache
 * older than the datastore file), buffered otherwise. The SAN writer reads
 * the LUN at the disk's extents. */

struct rfd {
    int fd, fd_direct;
    const char *path;
    const struct san_writer *san;   /* SAN: map disk offsets onto the LUN */
};

static void *rfd_open(const char *path, const struct san_writer *san, struct vmr_error *err)
{
    struct rfd *r = calloc(1, sizeof *r);
    if (r == NULL) {
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return NULL;
    }
    r->path = path;
    r->san = san;
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        vmr_error_set(err, VMR_E_TARGET, errno, UINT64_MAX, "%s: cannot open for reading: %s",
                      path, strerror(errno));
        free(r);
        return NULL;
    }
    r->fd_direct = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
    return r;
}

static void rfd_close(void *rh)
{
    struct rfd *r = rh;
    if (r->fd_direct >= 0)
        close(r->fd_direct);
    close(r->fd);
    free(r);
}

/* Read exactly count bytes at the file offset off (EOF inside the range is an error). */
static int rfd_read_at(struct rfd *r, void *buf, uint32_t count, uint64_t off,
                       uint64_t disk_off, struct vmr_error *err)
{
    int fd = r->fd;
    if (r->fd_direct >= 0 && ((uintptr_t)buf % VMR_ALIGN) == 0 && off % 4096 == 0 &&
        count % 4096 == 0)
        fd = r->fd_direct;
    size_t done = 0;
    while (done < count) {
        ssize_t k = pread(fd, (char *)buf + done, count - done, (off_t)(off + done));
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && errno == EINVAL && fd == r->fd_direct) {
            fd = r->fd;
            continue;
        }
        if (k <= 0) {
            int e = k < 0 ? errno : 0;
            vmr_error_set(err, VMR_E_TARGET, e, disk_off + done,
                          "%s: read of %u bytes at offset %llu failed: %s", r->path, count,
                          (unsigned long long)(off + done), e ? strerror(e) : "end of file");
            return -1;
        }
        done += (size_t)k;
    }
    return 0;
}

static int fr_pread(void *rh, void *buf, uint32_t count, uint64_t off, struct vmr_error *err)
{
    return rfd_read_at(rh, buf, count, off, off, err);
}

/* A regular file's hole reads as zeros: SEEK_DATA finds no data inside the range. */
static int fr_known_zero(void *rh, uint64_t off, uint64_t count)
{
    struct rfd *r = rh;
    off_t d = lseek(r->fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return errno == ENXIO;   /* no data at or after off */
    return (uint64_t)d >= off + count;
}

/* ------------------------------------------------------------ file writer */

struct file_writer {
    struct fio io;
    char *path;
};

static uint64_t fw_get_size(void *w) { return ((struct file_writer *)w)->io.size; }
static int yes(void *w) { return 1; }
static int no(void *w) { return 0; }
static void *fw_open_lane(void *w, int i, struct vmr_error *err) { return w; }
static int fw_close_lane(void *lane, struct vmr_error *err) { return 0; }

static void fw_close(void *w)
{
    struct file_writer *fw = w;
    fio_close(&fw->io);
    free(fw->path);
    free(fw);
}

static int fw_pwrite(void *lane, const void *buf, uint32_t count, uint64_t off, uint32_t flags,
                     struct vmr_error *err)
{
    return fio_pwrite(&((struct file_writer *)lane)->io, buf, count, off, err);
}

static int fw_zero(void *lane, uint32_t count, uint64_t off, uint32_t flags,
                   struct vmr_error *err)
{
    return fio_zero(&((struct file_writer *)lane)->io, count, off, flags, err);
}

static int fw_flush(void *lane, uint32_t flags, struct vmr_error *err)
{
    return fio_flush(&((struct file_writer *)lane)->io, err);
}

static void *fw_open_read(void *w, int i, struct vmr_error *err)
{
    return rfd_open(((struct file_writer *)w)->path, NULL, err);
}

static const struct vmr_writer_ops file_ops = {
    .abi_version = VMR_WRITER_ABI_VERSION,
    .struct_size = sizeof(struct vmr_writer_ops),
    .name = "file",
    .get_size = fw_get_size,
    .can_zero = yes,
    .can_fast_zero = no,
    .can_trim = yes,
    .can_flush = yes,
    .can_multi_conn = yes,
    .close = fw_close,
    .open_lane = fw_open_lane,
    .close_lane = fw_close_lane,
    .pwrite = fw_pwrite,
    .zero = fw_zero,
    .flush = fw_flush,
    .open_read = fw_open_read,
    .pread = fr_pread,
    .known_zero = fr_known_zero,
    .close_read = rfd_close,
};

int vmr_file_writer_open(const char *path, uint64_t size, uint32_t flags, struct vmr_writer *out,
                         struct vmr_error *err)
{
    memset(out, 0, sizeof *out);
    struct file_writer *fw = calloc(1, sizeof *fw);
    if (fw)
        fw->path = strdup(path);
    if (fw == NULL || fw->path == NULL) {
        free(fw);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    if (fio_open(&fw->io, fw->path, size, flags, out->note, sizeof out->note, err) != 0) {
        free(fw->path);
        free(fw);
        return -1;
    }
    out->ops = &file_ops;
    out->w = fw;
    out->max_request = 1u << 30;
    /* a file we just created is sparse: it reads as zeros */
    out->target_zeroed = (flags & VMR_FILE_TARGET_ZEROED) || fw->io.created;
    out->created = fw->io.created;
    out->created_dev = fw->io.dev;
    out->created_ino = fw->io.ino;
    return 0;
}

/* ------------------------------------------------------------- SAN writer */

struct san_writer {
    struct fio io;
    char *path;
    struct vmr_extent *map;
    size_t n;
    uint64_t size;
};

/* Index of the extent containing virtual offset v (map is sorted and gap-free). */
static size_t san_find(const struct san_writer *sw, uint64_t v)
{
    size_t lo = 0, hi = sw->n;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (sw->map[mid].voff <= v)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Apply fn to each physical piece of [off, off+count). */
static int san_each(struct san_writer *sw, const void *buf, uint64_t count, uint64_t off,
                    uint32_t flags, int zero, struct vmr_error *err)
{
    size_t i = san_find(sw, off);
    uint64_t done = 0;
    while (done < count) {
        if (i >= sw->n) {
            vmr_error_set(err, VMR_E_TARGET, 0, off + done,
                          "%s: disk offset %llu is outside the extent map", sw->path,
                          (unsigned long long)(off + done));
            return -1;
        }
        const struct vmr_extent *x = &sw->map[i];
        uint64_t v = off + done;
        uint64_t in = v - x->voff;
        uint64_t k = x->len - in;
        if (k > count - done)
            k = count - done;
        int rc = zero ? fio_zero(&sw->io, k, x->loff + in, flags, err)
                      : fio_pwrite(&sw->io, (const char *)buf + done, (uint32_t)k,
                                   x->loff + in, err);
        if (rc != 0) {
            err->offset = v;
            return -1;
        }
        done += k;
        i++;
    }
    return 0;
}

static uint64_t sw_get_size(void *w) { return ((struct san_writer *)w)->size; }

static void sw_close(void *w)
{
    struct san_writer *sw = w;
    fio_close(&sw->io);
    free(sw->map);
    free(sw->path);
    free(sw);
}

static int sw_pwrite(void *lane, const void *buf, uint32_t count, uint64_t off, uint32_t flags,
                     struct vmr_error *err)
{
    return san_each(lane, buf, count, off, flags, 0, err);
}

static int sw_zero(void *lane, uint32_t count, uint64_t off, uint32_t flags,
                   struct vmr_error *err)
{
    /* never deallocate on a LUN: the disk's extents must stay where the map says */
    return san_each(lane, NULL, count, off, flags & ~VMR_F_MAY_TRIM, 1, err);
}

static int sw_flush(void *lane, uint32_t flags, struct vmr_error *err)
{
    return fio_flush(&((struct san_writer *)lane)->io, err);
}

static void *sw_open_read(void *w, int i, struct vmr_error *err)
{
    struct san_writer *sw = w;
    return rfd_open(sw->path, sw, err);
}

/* Read [off, off+count) of the disk from the LUN, extent by extent. */
static int sr_pread(void *rh, void *buf, uint32_t count, uint64_t off, struct vmr_error *err)
{
    struct rfd *r = rh;
    const struct san_writer *sw = r->san;
    size_t i = san_find(sw, off);
    uint64_t done = 0;
    while (done < count) {
        uint64_t v = off + done;
        if (i >= sw->n || v < sw->map[i].voff || v - sw->map[i].voff >= sw->map[i].len) {
            vmr_error_set(err, VMR_E_TARGET, 0, v, "%s: disk offset %llu is outside the extent map",
                          sw->path, (unsigned long long)v);
            return -1;
        }
        const struct vmr_extent *x = &sw->map[i];
        uint64_t in = v - x->voff;
        uint64_t k = x->len - in;
        if (k > count - done)
            k = count - done;
        if (rfd_read_at(r, (char *)buf + done, (uint32_t)k, x->loff + in, v, err) != 0)
            return -1;
        done += k;
        i++;
    }
    return 0;
}

static const struct vmr_writer_ops san_ops = {
    .abi_version = VMR_WRITER_ABI_VERSION,
    .struct_size = sizeof(struct vmr_writer_ops),
    .name = "san",
    .get_size = sw_get_size,
    .can_zero = yes,
    .can_fast_zero = no,
    .can_trim = no,
    .can_flush = yes,
    .can_multi_conn = yes,
    .close = sw_close,
    .open_lane = fw_open_lane,
    .close_lane = fw_close_lane,
    .pwrite = sw_pwrite,
    .zero = sw_zero,
    .flush = sw_flush,
    .open_read = sw_open_read,
    .pread = sr_pread,
    .known_zero = NULL,
    .close_read = rfd_close,
};

int vmr_san_writer_open(const char *lun_path, const struct vmr_extent *map, size_t n,
                        uint64_t size, uint32_t flags, struct vmr_writer *out,
                        struct vmr_error *err)
{
    memset(out, 0, sizeof *out);
    /* the map must cover [0, size) in order, without gaps */
    uint64_t at = 0;
    for (size_t i = 0; i < n && at < size; i++) {
        if (map[i].voff != at || map[i].len == 0) {
            vmr_error_set(err, VMR_E_TARGET, 0, at,
                          "%s: the extent map does not cover the disk: first uncovered offset "
                          "%llu (thin or sparse disk; SAN needs a thick disk)",
                          lun_path, (unsigned long long)at);
            return -1;
        }
        at += map[i].len;
    }
    if (at < size) {
        vmr_error_set(err, VMR_E_TARGET, 0, at,
                      "%s: the extent map does not cover the disk: first uncovered offset %llu "
                      "(thin or sparse disk; SAN needs a thick disk)",
                      lun_path, (unsigned long long)at);
        return -1;
    }
    struct san_writer *sw = calloc(1, sizeof *sw);
    if (sw) {
        sw->path = strdup(lun_path);
        sw->map = malloc((n ? n : 1) * sizeof *map);
    }
    if (sw == NULL || sw->path == NULL || sw->map == NULL) {
        if (sw) {
            free(sw->path);
            free(sw->map);
        }
        free(sw);
        vmr_error_set(err, VMR_E_INTERNAL, ENOMEM, UINT64_MAX, "out of memory");
        return -1;
    }
    memcpy(sw->map, map, n * sizeof *map);
    sw->n = n;
    sw->size = size;
    uint64_t lun_end = 0;
    for (size_t i = 0; i < n; i++)
        if (map[i].loff + map[i].len > lun_end)
            lun_end = map[i].loff + map[i].len;
    /* the LUN always exists and is written in place */
    if (fio_open(&sw->io, sw->path, lun_end, (flags & ~VMR_FILE_CREATE) | VMR_FILE_FORCE,
                 out->note, sizeof out->note, err) != 0) {
        free(sw->path);
        free(sw->map);
        free(sw);
        return -1;
    }
    out->ops = &san_ops;
    out->w = sw;
    out->max_request = 1u << 30;
    out->target_zeroed = (flags & VMR_FILE_TARGET_ZEROED) != 0;
    return 0;
}
