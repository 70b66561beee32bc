/* vmrestore core: the compare stage of a quick rollback.
 *
 * A quick rollback restores a disk that already exists (the original VM)
 * by writing only what differs from the restore point. The pipeline's
 * readers, in compare mode (vmr_pipeline_config.compare), first read each
 * plan entry's range from the target through the writer's read side
 * (writer.h: open_read / pread / known_zero) into the slot's aligned block
 * buffer and decide here whether the target already holds it:
 *
 *   data entry   XXH3-128 of the target's bytes == the plan's checksum
 *                (the one the backup stores for the block)
 *   zero entry   the range is a known hole (known_zero), or reads as zeros
 *
 * Only an entry that differs goes on to be read from the backup,
 * decompressed, verified and written, exactly as in a restore.
 */
#ifndef VMR_COMPARE_H
#define VMR_COMPARE_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline.h"

enum { VMR_CMP_SAME = 0, VMR_CMP_DIFFERS = 1 };

/* What one comparison cost: target bytes read, and bytes known zero unread. */
struct vmr_cmp_cost {
    uint64_t bytes_read;
    uint64_t bytes_known_zero;
};

/* Compare plan entry pe with what the target holds, reading through the
 * writer's read handle rh into buf (cap bytes, VMR_ALIGN aligned; a zero run
 * longer than cap is read cap bytes at a time). Returns VMR_CMP_SAME,
 * VMR_CMP_DIFFERS, or -1 with *err set (a read that failed). Adds to *cost. */
int vmr_compare_entry(const struct vmr_writer_ops *ops, void *rh,
                      const struct vmr_plan_entry *pe, unsigned char *buf, size_t cap,
                      struct vmr_cmp_cost *cost, struct vmr_error *err);

#endif
