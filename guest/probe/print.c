/* Serial output: one `outb` per byte to COM1's transmit register. No UART
 * set-up and no status polling: every port access is a costly VM exit. */
#include "probe.h"

#define COM1 0x3f8

static u32 print_lock;

static void put_str(const char *s)
{
	for (; *s; s++)
		outb(COM1, *s);
}

static void put_num(u64 v, u32 base)
{
	char buf[24];
	int n = 0;

	if (base == 16)
		put_str("0x");
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n)
		outb(COM1, buf[--n]);
}

void pr(const char *fmt, ...)
{
	__builtin_va_list ap;

	__builtin_va_start(ap, fmt);
	while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
		asm volatile("pause");
	for (; *fmt; fmt++) {
		bool wide = false;

		if (*fmt != '%') {
			outb(COM1, *fmt);
			continue;
		}
		if (fmt[1] == 'l') {
			wide = true;
			fmt++;
		}
		switch (*++fmt) {
		case 's':
			put_str(__builtin_va_arg(ap, const char *));
			break;
		case 'c':
			outb(COM1, __builtin_va_arg(ap, int));
			break;
		case 'x':
		case 'u':
			put_num(wide ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32),
				*fmt == 'x' ? 16 : 10);
			break;
		}
	}
	__atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
	__builtin_va_end(ap);
}

/* The compiler may emit calls to these for struct copies. */
void *memcpy(void *d, const void *s, unsigned long n)
{
	void *r = d;

	asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

void *memset(void *d, int c, unsigned long n)
{
	void *r = d;

	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}
