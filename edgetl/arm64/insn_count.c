/*
 * edgetl instruction counter: a qemu-user TCG plugin (plugin API version 1, qemu 7.2).
 *
 * Why: emulated wall time says little about a phone, but the number of guest instructions a model's
 * invoke executes is a property of the code the runtime picked for that CPU, and it repeats.
 * The benchmark brackets each invoke with a marker syscall (a number no kernel uses, so qemu answers
 * ENOSYS and nothing else happens); this plugin sees the syscall before qemu handles it and records the
 * instructions executed by all guest threads between a start and a stop marker.
 *
 * Arguments: out=PATH (JSON written at exit).  Built at set-up by edgetl with the system C compiler.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define EDGETL_MARKER_SYSCALL 0x0E7B /* 3707: far above every aarch64 Linux syscall number */
#define EDGETL_MARKER_MAGIC 0x6564676574ULL /* "edget" */
#define EDGETL_MARK_START 1
#define EDGETL_MARK_STOP 2

static uint64_t executed; /* instructions of every translated block run, all threads */
static uint64_t started_at;
static int counting;
static uint64_t *per_invoke;
static size_t n_invokes, cap_invokes;
static char *out_path;

static void on_block(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    __atomic_fetch_add(&executed, (uint64_t)(uintptr_t)udata, __ATOMIC_RELAXED);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                       uint64_t a8)
{
    (void)id; (void)vcpu_index; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != EDGETL_MARKER_SYSCALL || a1 != EDGETL_MARKER_MAGIC) {
        return;
    }
    uint64_t now = __atomic_load_n(&executed, __ATOMIC_RELAXED);
    if (a2 == EDGETL_MARK_START) {
        started_at = now;
        counting = 1;
    } else if (a2 == EDGETL_MARK_STOP && counting) {
        uint64_t delta = now - started_at;
        if (n_invokes == cap_invokes) {
            size_t cap = cap_invokes ? cap_invokes * 2 : 1024;
            uint64_t *grown = realloc(per_invoke, cap * sizeof(uint64_t));
            if (grown == NULL) {
                return;
            }
            per_invoke = grown;
            cap_invokes = cap;
        }
        per_invoke[n_invokes++] = delta;
        counting = 0;
    }
}

static void on_guest_exit(qemu_plugin_id_t id, void *p)
{
    (void)id; (void)p;
    FILE *f = out_path ? fopen(out_path, "w") : NULL;
    if (f == NULL) {
        qemu_plugin_outs("edgetl insn_count: cannot write the result file\n");
        return;
    }
    fprintf(f, "{\"plugin\": \"edgetl-insn-count\", \"version\": 1, \"total\": %" PRIu64 ", \"per_invoke\": [",
            executed);
    for (size_t i = 0; i < n_invokes; i++) {
        fprintf(f, "%s%" PRIu64, i ? ", " : "", per_invoke[i]);
    }
    fprintf(f, "]}\n");
    fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "edgetl insn_count: unknown argument %s (valid: out=PATH)\n", argv[i]);
            return -1;
        }
    }
    if (out_path == NULL) {
        fprintf(stderr, "edgetl insn_count: missing out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_guest_exit, NULL);
    return 0;
}
