/*
 * Minimal Cortex-M4 startup for qemu's mps2-an386: vector table, FPU on,
 * .data copied and .bss zeroed, main(), stack painting for main's
 * measurements, and the result reported through ARM semihosting (bare BKPT 0xAB calls, no libc I/O).
 */
#include <stdint.h>

#include "firmware.h"

extern uint32_t _sidata[], _sdata[], _edata[], _sbss[], _ebss[];
extern uint32_t _stack_limit[], _stack_top[];

int main(void);
void Reset_Handler(void);
void Fault_Handler(void);

/* ---- semihosting ------------------------------------------------------ */

static int semihost(int op, const void *arg) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void fw_puts(const char *s) { semihost(0x04 /* SYS_WRITE0 */, s); }

void fw_put_u32(uint32_t v) {
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    fw_puts(&buf[i]);
}

void fw_exit(int failed) {
    /* SYS_EXIT with ADP_Stopped_ApplicationExit (qemu exits 0) or
     * ADP_Stopped_RunTimeErrorUnknown (qemu exits 1). */
    semihost(0x18, (const void *)(uintptr_t)(failed ? 0x20023 : 0x20026));
    for (;;) {
    }
}

/* ---- stack painting ---------------------------------------------------- */

#define PAINT 0xC0FFEE11u

static inline uintptr_t current_sp(void) {
    uintptr_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

/* Paints the free stack below the caller's frame (a 64-byte margin). */
__attribute__((noinline)) void fw_stack_paint(void) {
    uint32_t *end = (uint32_t *)((current_sp() - 64) & ~(uintptr_t)3);
    for (uint32_t *p = _stack_limit; p < end; p++) *p = PAINT;
}

/* Bytes of stack used below `top` since the last paint (the deepest word
 * that lost its paint). */
uint32_t fw_stack_used_below(uintptr_t top) {
    uint32_t *p = _stack_limit;
    while (p < _stack_top && *p == PAINT) p++;
    return (uintptr_t)p >= top ? 0 : (uint32_t)(top - (uintptr_t)p);
}

uintptr_t fw_sp(void) { return current_sp(); }

uintptr_t fw_stack_limit(void) { return (uintptr_t)_stack_limit; }

/* ---- reset ------------------------------------------------------------- */

void Reset_Handler(void) {
    /* Full access to CP10/CP11 (the FPU) before any floating-point code. */
    volatile uint32_t *cpacr = (volatile uint32_t *)0xE000ED88u;
    *cpacr |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");

    for (uint32_t *s = _sidata, *d = _sdata; d < _edata;) *d++ = *s++;
    for (uint32_t *d = _sbss; d < _ebss;) *d++ = 0;

    fw_exit(main());
}

void Fault_Handler(void) {
    fw_puts("FAIL: fault\n");
    fw_exit(1);
}

/* Initial stack pointer, reset, NMI, HardFault, MemManage, BusFault,
 * UsageFault; the rest of the 16 system vectors unused. */
__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))_stack_top, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler,
};
