/*
 * Real-mode setup area of probe.bzImage (Linux boot protocol 2.12): just
 * the boot sector and setup header a loader reads. There is no 16-bit code:
 * loaders must enter at code32_start (32-bit) or code32_start + 0x200
 * (64-bit). This section is not loaded; the Makefile puts it in front of
 * the flat image. Sizes come from probe.ld.
 */
#include "probe.h"

	.section .setup, ""
	.code16
setup:
	.org 0x1f1
	.byte 1			/* setup_sects: area = (1 + 1) * 512 bytes */
	.word 0			/* root_flags */
	.long _syssize		/* syssize: protected-mode part / 16 */
	.word 0			/* ram_size */
	.word 0xffff		/* vid_mode: normal */
	.word 0			/* root_dev */
	.word 0xaa55		/* boot_flag */
	.org 0x200
	jmp no_real_mode	/* jump */
	.ascii "HdrS"		/* header */
	.word 0x020c		/* version 2.12 */
	.long 0			/* realmode_swtch */
	.word 0x1000		/* start_sys_seg */
	.word version - 0x200	/* kernel_version */
	.byte 0			/* type_of_loader */
	.byte 0x01		/* loadflags: LOADED_HIGH */
	.word 0			/* setup_move_size */
	.long 0x100000		/* code32_start */
	.long 0			/* ramdisk_image */
	.long 0			/* ramdisk_size */
	.long 0			/* bootsect_kludge */
	.word 0			/* heap_end_ptr */
	.byte 0, 0		/* ext_loader_ver, ext_loader_type */
	.long 0			/* cmd_line_ptr */
	.long 0x7fffffff	/* initrd_addr_max */
	.long 0x100000		/* kernel_alignment */
	.byte 0			/* relocatable_kernel: no, runs at 1 MiB only */
	.byte 20		/* min_alignment: 1 MiB */
	.word 0x0001		/* xloadflags: XLF_KERNEL_64 (entry at +0x200) */
	.long CMDLINE_MAX - 1	/* cmdline_size */
	.long 0			/* hardware_subarch */
	.quad 0			/* hardware_subarch_data */
	.long 0			/* payload_offset */
	.long 0			/* payload_length */
	.quad 0			/* setup_data */
	.quad 0x100000		/* pref_address */
	.long _init_size	/* init_size: image + stacks */
	.long 0			/* handover_offset */
no_real_mode:
	cli
	hlt
	jmp no_real_mode
version:
	.asciz "Keel probe guest"
	.org 0x400
