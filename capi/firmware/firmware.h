/* The startup's services to main.c (startup.c). */
#ifndef FIRMWARE_H
#define FIRMWARE_H
#include <stdint.h>

void fw_puts(const char *s);
void fw_put_u32(uint32_t v);
void fw_exit(int failed);
void fw_stack_paint(void);
uint32_t fw_stack_used_below(uintptr_t top);
uintptr_t fw_sp(void);
uintptr_t fw_stack_limit(void);

#endif
